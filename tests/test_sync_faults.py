"""Faults a real Dovecot cannot produce on demand, against the scripted fake server."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._inbound import sync
from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.config_builder import build_config
from tests.fakes.imap_server import FakeImapServer
from tests.fakes.pipeline import mail, mid, running_engine


@pytest.fixture(autouse=True)
def _quick_refetch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync, "MISSING_RETRY_BASE_SECS", 0.01)


@pytest.fixture
async def fake() -> AsyncIterator[FakeImapServer]:
    server = await FakeImapServer().start()
    try:
        yield server
    finally:
        await server.stop()


def fake_config(server: FakeImapServer, tmp_path: Path, **kw: Any) -> EmailConfig:
    fields: dict[str, Any] = {
        "imap_port": server.port,
        "imap_security": "plain",
        "username": "bot@example.test",
        "password": "secret",
        "from_address": "bot@example.test",
        "connect_timeout_secs": 2.0,
        "command_timeout_secs": 2.0,
        "keepalive_secs": 30,
        "initial_sync": "unseen",
    }
    fields.update(kw)
    return build_config(tmp_path, **fields)


async def test_login_unavailable_is_an_outage_not_a_wrong_password(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    fake.login_reply = "NO [UNAVAILABLE] Maintenance, try later"
    fake.folders["INBOX"].add(mail(1))
    async with running_engine(fake_config(fake, tmp_path)) as run:
        await run.wait_for(lambda: run.metrics.get("imap.reconnects.network") >= 2)
        assert run.engine.status.last_error_code == "server_unavailable"
        assert not run.engine.status.auth_failed
        assert run.metrics.get("imap.reconnects.auth") == 0
        fake.login_reply = "OK Logged in"
        assert (await run.next()).id == mid(1)
        assert run.engine.status.connected


async def test_move_without_move_capability_uses_copy_and_uid_expunge(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    raw = mail(1)
    fake.folders["INBOX"].add(raw)
    async with running_engine(fake_config(fake, tmp_path, move_to_folder="Done")) as run:
        assert (await run.next()).id == mid(1)
        await run.wait_for(lambda: run.metrics.get("inbound.moved") == 1)
    sent = [c.split(" ", 1)[1] for c in fake.commands if " " in c]
    # The user name is quoted too (aioimaplib quotes only the password).
    assert 'LOGIN "bot@example.test" "secret"' in sent
    assert any(c.startswith("UID COPY 1 ") for c in sent)
    assert any(c.startswith("UID STORE 1 +FLAGS.SILENT (\\Deleted)") for c in sent)
    assert "UID EXPUNGE 1" in sent
    assert not any(c.startswith("UID MOVE") for c in sent)
    assert fake.folders["INBOX"].messages == {}
    assert list(fake.folders["Done"].messages.values()) == [raw]


async def test_without_move_or_uidplus_the_message_stays_and_the_error_is_counted(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    fake.capabilities = ("IMAP4rev1", "IDLE")
    fake.folders["INBOX"].add(mail(1))
    async with running_engine(fake_config(fake, tmp_path, move_to_folder="Done")) as run:
        assert (await run.next()).id == mid(1)
        await run.wait_for(lambda: run.metrics.get("inbound.errors") == 1)
        assert run.engine.status.connected
    assert list(fake.folders["INBOX"].messages) == [1]
    assert fake.folders["Done"].messages == {}


async def test_bye_in_idle_with_the_socket_left_open_reconnects_without_waiting(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    fake.bye_in_idle = True
    async with running_engine(fake_config(fake, tmp_path, keepalive_secs=600)) as run:
        await run.synced()
        # Far below the 600 s keepalive: the BYE itself ends the session.
        await run.wait_for(lambda: run.metrics.get("imap.reconnects.network") >= 1, timeout=5)
        assert run.engine.status.last_error_code == "connection_lost"
        assert "BYE" in (run.engine.status.last_error or "")
        fake.idling.clear()
        fake.bye_in_idle = False
        await asyncio.wait_for(fake.idling.wait(), 5)  # reconnected and idling normally again
        fake.deliver(mail(2))
        assert (await run.next()).id == mid(2)


async def test_idle_advertised_but_refused_falls_back_to_polling(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    fake.refuse_idle = True
    async with running_engine(fake_config(fake, tmp_path, poll_interval_secs=1)) as run:
        await run.wait_for(lambda: run.engine.status.mode == "poll")
        fake.deliver(mail(1))  # no push: only a poll finds it
        assert (await run.next()).id == mid(1)
        assert run.metrics.get("imap.connects") == 1
        assert run.engine.status.connected


async def test_a_body_missing_from_fetch_is_fetched_again_not_skipped(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    """Some servers leave a listed message out of a FETCH answer while they sync. The
    cursor must not pass it: it is fetched again and arrives, in order, exactly once."""
    box = fake.folders["INBOX"]
    box.add(mail(1))
    second = box.add(mail(2))
    box.add(mail(3))
    fake.omit_body[second] = 1  # left out of the first body FETCH only
    async with running_engine(fake_config(fake, tmp_path, initial_sync="unseen")) as run:
        assert await run.take(3) == [mid(1), mid(2), mid(3)]
        assert fake.omit_body[second] == 0
        assert run.metrics.get("inbound.errors") == 0


async def test_a_body_missing_while_idling_is_fetched_again(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    async with running_engine(fake_config(fake, tmp_path)) as run:
        await run.wait_for(fake.idling.is_set)
        fake.omit_body[1] = 2
        for n in (1, 2):
            fake.deliver(mail(n))
        assert await run.take(2) == [mid(1), mid(2)]
        assert fake.omit_body[1] == 0


async def test_a_body_that_never_comes_is_skipped_with_an_error_after_retries(
    fake: FakeImapServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = fake.folders["INBOX"]
    box.add(mail(1))
    stuck = box.add(mail(2))
    box.add(mail(3))
    fake.omit_body[stuck] = 1000
    monkeypatch.setattr(sync, "MISSING_GIVE_UP_SECS", 0.0)
    async with running_engine(fake_config(fake, tmp_path, initial_sync="unseen")) as run:
        assert await run.take(2) == [mid(1), mid(3)]
        assert run.metrics.get("inbound.errors") == 1
        assert fake.omit_body[stuck] == 1000 - 3  # fetched three times before giving up


async def test_close_is_not_held_up_by_a_server_that_never_answers_logout(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    """A cancel arriving while the engine logs out (after an error) must stop it;
    swallowing it kept the listener reconnecting and close() waiting forever."""
    fake.answer_logout = False
    channel = EmailChannel(fake_config(fake, tmp_path, imap_folder="Missing"))
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    listener = asyncio.create_task(channel.listen(queue))
    await asyncio.wait_for(fake.logout_seen.wait(), 10)  # in logout() after folder_missing
    await asyncio.wait_for(channel.close(), 5)
    assert listener.done() and listener.cancelled()


async def test_a_message_missing_from_the_size_fetch_is_not_passed_over(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    box = fake.folders["INBOX"]
    box.add(mail(1))
    second = box.add(mail(2))
    box.add(mail(3))
    fake.omit_meta[second] = 2
    async with running_engine(fake_config(fake, tmp_path, initial_sync="unseen")) as run:
        assert await run.take(3) == [mid(1), mid(2), mid(3)]
        assert run.metrics.get("inbound.errors") == 0


async def test_a_briefly_missing_body_is_not_given_up_after_a_few_quick_passes(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    """Giving up takes both tries and time: five quick misses are still retried."""
    box = fake.folders["INBOX"]
    box.add(mail(1))
    late = box.add(mail(2))
    fake.omit_body[late] = 5
    async with running_engine(fake_config(fake, tmp_path, initial_sync="unseen")) as run:
        assert await run.take(2) == [mid(1), mid(2)]
        assert run.metrics.get("inbound.errors") == 0


async def test_an_interrupted_unseen_first_start_never_hands_on_read_mail(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    """The first pass stops at a body it must fetch again; the next pass must still be
    a first start (unseen mail only), not a resume from a half-way cursor."""
    box = fake.folders["INBOX"]
    uids = [box.add(mail(n)) for n in range(1, 11)]
    for uid in uids:
        if uid not in (3, 8):
            box.flags[uid].add("\\Seen")
    fake.omit_body[8] = 1
    async with running_engine(fake_config(fake, tmp_path, initial_sync="unseen")) as run:
        assert await run.take(2) == [mid(3), mid(8)]
        run.engine.synced.clear()
        await run.wait_for(run.engine.synced.is_set)
        assert run.queue.empty(), "read mail was handed on"


async def test_a_duplicate_hiding_its_message_id_in_an_encoded_word_is_not_downloaded(
    fake: FakeImapServer, tmp_path: Path
) -> None:
    """The early duplicate check reads the Message-ID as the pipeline does (encoded
    words decoded), so a copy that disguises an id already handed on is skipped before
    its body is fetched: it never reaches the pipeline, and saves no attachments."""
    encoded = "=?utf-8?b?" + base64.b64encode(mid(1).encode()).decode() + "?="
    disguised = mail(2).replace(f"Message-ID: {mid(2)}".encode(), f"Message-ID: {encoded}".encode())
    async with running_engine(fake_config(fake, tmp_path)) as run:
        await run.wait_for(fake.idling.is_set)
        fake.deliver(mail(1))
        assert await run.take(1) == [mid(1)]
        await run.wait_for(fake.idling.is_set)  # back in IDLE: the next pushes are seen
        fake.deliver(disguised)
        fake.deliver(mail(3))
        assert await run.take(1) == [mid(3)]
        assert run.metrics.get("inbound.skipped.duplicate") == 1
        assert run.metrics.get("inbound.fetched") == 2
