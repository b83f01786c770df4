"""After hand-off (\\Seen, move), rejected mail left alone, size limit, and failures that
must show in the status: wrong password, missing folder."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.pipeline import HeaderPipeline, imap_config, mail, mid, running_engine
from tests.servers.dovecot import Account, DovecotServer

STRANGER = "mallory@example.test"


async def test_mark_seen_after_handoff_and_rejected_mail_left_untouched(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, mark_seen=True)
    pipeline = HeaderPipeline(config, reject={STRANGER})
    async with running_engine(config, pipeline=pipeline) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(1, sender=STRANGER))
        await dovecot.adeliver(account, mail(2))
        assert (await run.next()).id == mid(2)
        await run.synced()
        assert run.queue.empty()
    rejected, accepted = dovecot.list_uids(account)
    assert dovecot.flags(account, "INBOX", accepted) == {"\\Seen"}
    assert dovecot.flags(account, "INBOX", rejected) == set()
    # The rejection is remembered: a restart does not look at it again.
    async with running_engine(config, pipeline=pipeline) as run:
        await run.synced()
        assert run.queue.empty()


async def test_move_to_folder_after_handoff(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    dovecot.create_folder(account, "Processed")
    config = imap_config(dovecot, account, tmp_path, move_to_folder="Processed")
    pipeline = HeaderPipeline(config, reject={STRANGER})
    async with running_engine(config, pipeline=pipeline) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(1, sender=STRANGER))
        await dovecot.adeliver(account, mail(2))
        await dovecot.adeliver(account, mail(3))
        assert sorted(await run.take(2)) == [mid(2), mid(3)]
        await run.wait_for(lambda: run.metrics.get("inbound.moved") == 2)
    assert len(dovecot.list_uids(account, "Processed")) == 2
    left = dovecot.list_uids(account, "INBOX")
    assert len(left) == 1 and b"mallory" in dovecot.fetch_raw(account, "INBOX", left[0])


async def test_oversized_message_is_not_downloaded_but_announced(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, max_message_bytes=20_000)
    pipeline = HeaderPipeline(config)
    async with running_engine(config, pipeline=pipeline) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(1, size=60_000))
        await dovecot.adeliver(account, mail(2))
        notice, small = await run.next(), await run.next()
        assert notice.id == mid(1) and notice.subject.startswith("[too large")
        assert small.id == mid(2)
        assert run.metrics.get("inbound.too_large") == 1
        assert run.metrics.get("inbound.fetched") == 1  # only the small one's body
    [(header, size)] = pipeline.oversized
    assert size > 60_000 and b"Message-ID: <t-1@example.test>" in header
    assert b"Hello number" not in header


async def test_wrong_password_shows_as_auth_failure_and_keeps_retrying(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, password="wrong")
    async with running_engine(config) as run:
        await run.wait_for(lambda: run.metrics.get("imap.reconnects.auth") >= 2)
        status = run.engine.status
        assert status.auth_failed and not status.connected
        assert status.last_error_code == "auth_failed"
        assert run.metrics.get("imap.reconnects.network") == 0
        assert "wrong" not in (status.last_error or "")


async def test_missing_folder_is_reported_then_picked_up_once_created(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, imap_folder="Bot")
    async with running_engine(config) as run:
        await run.wait_for(lambda: run.engine.status.last_error_code == "folder_missing")
        assert "INBOX" in (run.engine.status.last_error or "")
        dovecot.create_folder(account, "Bot")
        await run.synced()
        await dovecot.adeliver(account, mail(1), folder="Bot")
        assert (await run.next()).id == mid(1)
