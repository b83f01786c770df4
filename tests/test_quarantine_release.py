"""Releasing quarantined mail, against the real Dovecot: once, through the ordinary
hand-off, from the API or from the CLI in another process, across a restart, and
never past the allow-list or sender authentication."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from prx_channel_email import ChannelError, EmailChannel, QuarantinedMessage
from prx_channel_email._handoff.ledger import LedgerWriter
from prx_channel_email._storage import HandoffBatch
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email.cli import app
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import Listening, e2e_config, letter, listening

ANNA, MALLORY = "anna@example.org", "mallory@example.org"
TRUSTED = {"sender_auth": "enforce", "trusted_authserv_ids": ["mx.example.test"]}
PASS = "Authentication-Results: mx.example.test; dmarc=pass header.from=example.org"


async def _quarantine(
    run: Listening, dovecot: DovecotServer, account: Account, sender: str, *extra: str
) -> tuple[str, QuarantinedMessage]:
    """Deliver ``sender``'s mail naming the bot in Reply-To (plus ``extra`` headers) and
    wait until its quarantine is recorded; its Message-ID and listing."""
    mid, raw = letter(sender, f"Reply-To: {account.address}", *extra)
    before = run.channel.stats().get("inbound.quarantined", 0)
    await dovecot.adeliver(account, raw)
    await run.until(lambda: run.channel.stats().get("inbound.quarantined", 0) > before)
    await run.until(lambda: not run.channel.sync.writer._pending)  # recorded
    (held,) = [q for q in await run.channel.quarantined() if q.message_id == mid]
    return mid, held


def cli_config(config: EmailConfig, path: Path) -> Path:
    """A config file for the CLI naming the same server and state as ``config``."""
    fields = {"imap_host": config.imap_host, "imap_port": config.imap_port,
              "imap_security": config.imap_security, "smtp_host": "127.0.0.1",
              "username": config.username, "password": "x",
              "from_address": config.from_address, "state_dir": str(config.state_dir)}  # fmt: skip
    if config.state_url is not None:
        fields["state_url"] = config.state_url.get_secret_value()
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path.write_text("\n".join(["[channels_config.email]", *lines]) + "\n")
    return path


async def _cli(*args: Any) -> Result:
    """The CLI as the operator runs it (asyncio.run inside: off this loop)."""
    invoke = functools.partial(CliRunner().invoke, app)
    return await asyncio.to_thread(invoke, [str(a) for a in args])


async def test_a_release_through_the_api_hands_it_on_once_and_a_second_is_refused(
    dovecot: DovecotServer, account: Account, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The bot's own domain is allowed too: its Reply-To would pass as a reply target.
    ours = "@" + account.address.rpartition("@")[2]
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA, ours])
    caplog.set_level(logging.INFO, "prx_channel_email")
    async with listening(config) as run:
        mid, held = await _quarantine(run, dovecot, account, ANNA)
        assert held.reason == "own_mail" and run.queue.empty()
        await run.channel.release_quarantined(held.id)
        message = await run.next()
        assert (message.id, message.sender, message.redelivered) == (mid, ANNA, False)
        assert message.reply_target == ANNA  # never the bot the Reply-To named
        assert message.content == "hello"
        stats = run.channel.stats()
        assert stats["inbound.quarantine_released"] == 1
        assert await run.channel.quarantined() == []
        with pytest.raises(ChannelError) as twice:
            await run.channel.release_quarantined(held.id)
        assert twice.value.code == "quarantine_already_released"
        with pytest.raises(ChannelError) as unknown:
            await run.channel.release_quarantined(f"INBOX:{held.id.split(':')[1]}:9999")
        assert unknown.value.code == "quarantine_unknown"
        with pytest.raises(ChannelError) as garbled:
            await run.channel.release_quarantined("not an id")
        assert garbled.value.code == "invalid_argument"
        await run.channel.ack(message)  # like any mail: acked, settled
        # A reply threads onto it (the ledger knows it as handed on).
        assert (await run.channel.outbox.parent_entry(message.reply("ok"))) is not None
        assert run.queue.empty()
    released = [getattr(r, "prx", {}) for r in caplog.records
                if getattr(r, "prx", {}).get("event") == "inbound.quarantine_released"]  # fmt: skip
    assert len(released) == 1
    assert {k: released[0][k] for k in ("account", "uid", "message_id", "reason")} == {
        "account": config.account, "uid": int(held.id.rsplit(":", 1)[1]),
        "message_id": mid, "reason": "own_mail"}  # fmt: skip
    async with listening(config) as run:  # nothing comes again after a restart
        await run.until(lambda: run.channel.sync.synced.is_set())
        assert run.queue.empty() and run.channel.stats().get("inbound.redelivered", 0) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_release_from_the_cli_reaches_the_running_channel(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """The CLI is another process: it records the request, the running channel sees it
    within seconds (not at its next keepalive), hands the mail on and the CLI says so.
    The same with the state on PostgreSQL (a replica holding the mailbox's lease)."""
    shared = {"state_url": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA], keepalive_secs=600,
                        **shared)  # fmt: skip
    path = cli_config(config, tmp_path / "prx.toml")
    async with listening(config) as run:
        mid, held = await _quarantine(run, dovecot, account, ANNA)
        done = await _cli("quarantine", "release", held.id, "--wait", 20, "--config", path)
        assert done.exit_code == 0, done.output
        assert f"released {held.id}" in done.output and mid in done.output
        assert (await run.next()).id == mid
        again = await _cli("quarantine", "release", held.id, "--config", path)
        assert again.exit_code != 0 and "quarantine_already_released" in again.output
        unknown = await _cli("quarantine", "release", "INBOX:1:424242", "--config", path)
        assert unknown.exit_code != 0 and "quarantine_unknown" in unknown.output
        assert "Traceback" not in again.output + unknown.output
        # Gone from the server before the release: said so, nothing handed on.
        _, gone = await _quarantine(run, dovecot, account, ANNA)
        dovecot.expunge(account, "INBOX", int(gone.id.rsplit(":", 1)[1]))
        lost = await _cli("quarantine", "release", gone.id, "--wait", 20, "--config", path)
        assert lost.exit_code != 0 and "quarantine_gone" in lost.output, lost.output
        assert run.queue.empty()
        assert run.channel.stats()["inbound.quarantine_release_failed"] == 1


async def test_a_release_requested_while_no_channel_runs_is_handed_on_once_at_the_next_start(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """The request is durable: asked while nothing listens (as after a process died
    between the request and the hand-off), it is carried out at the next start, once;
    a kill after its hand-off commit repeats it as any unacknowledged mail is repeated
    (``redelivered``), never as a second release."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA], handoff="ack")
    path = cli_config(config, tmp_path / "prx.toml")
    async with listening(config) as run:
        mid, held = await _quarantine(run, dovecot, account, ANNA)
    # A host whose channel is not listening: recorded, and told it is pending.
    async with type(run.channel)(config) as idle:
        with pytest.raises(ChannelError) as pending:
            await idle.release_quarantined(held.id)
    assert pending.value.code == "quarantine_release_pending"
    # The request stands: asking again (CLI, not waiting) says it is under way.
    asked = await _cli("quarantine", "release", held.id, "--wait", 0, "--config", path)
    assert asked.exit_code != 0 and "quarantine_already_released" in asked.output
    async with listening(config) as run:
        message = await run.next()
        assert (message.id, message.redelivered) == (mid, False)
        # Not acked: the process stops as if killed after the commit.
    async with listening(config) as run:
        again = await run.next()
        assert (again.id, again.redelivered) == (mid, True)
        await run.channel.ack(again)
        assert run.channel.stats().get("inbound.quarantine_released", 0) == 0
    async with listening(config) as run:
        assert run.queue.empty()
        assert run.channel.stats().get("inbound.redelivered", 0) == 0


async def test_a_release_never_lets_a_forged_or_removed_sender_through(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """The release sets aside only the Reply-To that quarantined the mail: a From that
    fails authentication, a sender taken off the allow-list, and a sender the provider
    could not check (temperror) stay out of the agent's reach."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA, MALLORY], **TRUSTED)
    forged_ar = "Authentication-Results: mx.example.test; dmarc=fail header.from=example.org"
    temp_ar = "Authentication-Results: mx.example.test; dmarc=temperror header.from=example.org"
    async with listening(config) as run:
        _, forged = await _quarantine(run, dovecot, account, ANNA, forged_ar)
        assert forged.reason == "own_mail"  # the loop guard decides before authenticity
        with pytest.raises(ChannelError) as refused:
            await run.channel.release_quarantined(forged.id)
        assert refused.value.code == "quarantine_release_refused"
        assert "unverified_sender" in str(refused.value)
        _, removed = await _quarantine(run, dovecot, account, MALLORY, PASS)
        await run.channel.remove_sender(MALLORY)
        with pytest.raises(ChannelError) as stranger:
            await run.channel.release_quarantined(removed.id)
        assert stranger.value.code == "quarantine_release_refused"
        assert "not_allowed" in str(stranger.value)
        unchecked_id, raw = letter(ANNA, temp_ar)
        await dovecot.adeliver(account, raw)
        await run.until(lambda: run.channel.stats().get("inbound.quarantined") == 3)
        await run.until(lambda: not run.channel.sync.writer._pending)
        (unchecked,) = [q for q in await run.channel.quarantined()
                        if q.message_id == unchecked_id]  # fmt: skip
        assert unchecked.reason == "unverified_sender"
        with pytest.raises(ChannelError) as unverifiable:
            await run.channel.release_quarantined(unchecked.id)
        assert unverifiable.value.code == "quarantine_not_releasable"
        assert run.queue.empty()
        # All three are still quarantined (and listed): nothing was lost either.
        listed = {q.id for q in await run.channel.quarantined()}
        assert {forged.id, removed.id, unchecked.id} <= listed
        # A refused release may be asked again once its cause is fixed.
        await run.channel.allow_sender(MALLORY)
        await run.channel.release_quarantined(removed.id)
        assert (await run.next()).sender == MALLORY
        assert run.queue.empty()


async def test_mail_that_cannot_be_read_is_read_again_and_stays_quarantined_if_it_still_cannot(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """A release of unreadable mail is one more try (an upgrade may read it): a MIME tree
    nested too deep still cannot be, so the release fails with a clear code and the
    mail stays quarantined, unread on the server."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA])
    opening = "".join(
        f'Content-Type: multipart/mixed; boundary="b{d}"\r\n\r\n--b{d}\r\n' for d in range(400)
    )
    closing = "".join(f"\r\n--b{d}--\r\n" for d in reversed(range(400)))
    head = (f"From: {ANNA}\r\nTo: bot@example.test\r\nSubject: deep\r\n"
            "Message-ID: <deep@example.org>\r\nMIME-Version: 1.0\r\n")  # fmt: skip
    raw = (head + opening + "Content-Type: text/plain\r\n\r\nhi\r\n" + closing).encode()
    async with listening(config) as run:
        await dovecot.adeliver(account, raw)
        await run.until(lambda: run.channel.stats().get("inbound.quarantined") == 1)
        await run.until(lambda: not run.channel.sync.writer._pending)
        (deep,) = await run.channel.quarantined()
        assert (deep.message_id, deep.reason) == ("<deep@example.org>", "mime_too_complex")
        with pytest.raises(ChannelError) as unreadable:
            await run.channel.release_quarantined(deep.id)
        assert unreadable.value.code == "quarantine_unreadable"
        assert [q.id for q in await run.channel.quarantined()] == [deep.id]
        assert run.queue.empty()
    uid = int(deep.id.rsplit(":", 1)[1])
    assert "\\Seen" not in dovecot.flags(account, "INBOX", uid)


@pytest.mark.parametrize("stop", ["before_commit", "after_commit"])
async def test_a_stop_on_either_side_of_the_release_commit_hands_it_on_exactly_once(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: str,
) -> None:
    """The process stops at the release's commit point, deterministically: just before
    its commit the request is still pending and the next start hands the mail on fresh;
    just after it (before the put) the mail is in flight and the next start hands it on
    again as ``redelivered``. Either way exactly once more, never twice."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA], handoff="ack")
    async with listening(config) as run:
        mid, held = await _quarantine(run, dovecot, account, ANNA)
    async with EmailChannel(config) as idle:
        with pytest.raises(ChannelError):  # recorded; nothing listens: pending
            await idle.release_quarantined(held.id)
    reached = asyncio.Event()
    if stop == "before_commit":
        commit = StateStore.commit_handoff

        async def stuck_commit(self: StateStore, batch: HandoffBatch) -> None:
            if batch.releases:
                reached.set()
                await asyncio.Event().wait()  # the process dies here
            await commit(self, batch)

        monkeypatch.setattr(StateStore, "commit_handoff", stuck_commit)
    else:
        put = LedgerWriter._put

        async def stuck_put(self: LedgerWriter, message: ChannelMessage, *args: Any) -> None:
            if message.id == mid:
                reached.set()
                await asyncio.Event().wait()  # the process dies here
            await put(self, message, *args)

        monkeypatch.setattr(LedgerWriter, "_put", stuck_put)
    channel = EmailChannel(config)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        await asyncio.wait_for(reached.wait(), 15)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    assert queue.empty()
    monkeypatch.undo()
    async with listening(config) as run:
        again = await run.next()
        assert (again.id, again.redelivered) == (mid, stop == "after_commit")
        await run.channel.ack(again)
        fresh = run.channel.stats().get("inbound.quarantine_released", 0)
        assert fresh == (1 if stop == "before_commit" else 0)
        assert run.queue.empty()
    async with listening(config) as run:
        assert run.queue.empty()
        assert run.channel.stats().get("inbound.redelivered", 0) == 0
        assert run.channel.stats().get("inbound.quarantine_released", 0) == 0
