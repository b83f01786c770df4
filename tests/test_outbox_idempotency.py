"""Idempotent sends, the ack hook, and the "sent" mark written as soon as the server accepts."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.errors import SendError
from prx_channel_email.models import ChannelMessage, SendMessage
from tests.outbound_helpers import ANN, seed_ledger, smtp_config
from tests.servers.proxy import TcpProxy
from tests.servers.smtp import SmtpServer
from tests.test_outbox import rows, running_outbox, via_proxy

V1_STATE = Path(__file__).resolve().parent / "data" / "state_v1.sqlite3"


def received(mid: str = "<q1@people.example>") -> ChannelMessage:
    return ChannelMessage(
        id=mid, sender=ANN, reply_target=ANN, subject="Numbers", timestamp=0, thread_ts=mid
    )


async def test_a_repeated_key_sends_nothing_and_returns_the_first_message_id(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        message = SendMessage(content="the report", recipient=ANN, idempotency_key="job-42")
        first = await outbox.send(message)
        again = await outbox.send(message)
        # A retry may differ in anything but the key: the key alone decides.
        other_text = await outbox.send(message.model_copy(update={"content": "changed"}))
        assert again == first and other_text == first
        assert outbox.metrics.get("outbound.duplicates_suppressed") == 2
        fresh = await outbox.send(message.model_copy(update={"idempotency_key": "job-43"}))
        assert fresh != first
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 2, 0.3)
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [first, fresh]
    assert [(r["idempotency_key"], r["state"]) for r in rows(config)] == [
        ("job-42", "sent"),
        ("job-43", "sent"),
    ]


async def test_the_same_reply_sent_twice_mails_once(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await seed_ledger(outbox.store, config, message_id="<q1@people.example>", sender=ANN,
                          subject="Numbers")  # fmt: skip
        msg = received()
        first = await outbox.send(msg.reply("Here: 42"))
        second = await outbox.send(msg.reply("Here: 42"))  # a host retrying after a timeout
        other = await outbox.send(msg.reply("And one more thing"))
        assert second == first and other != first
        # Another message's identical text is another reply.
        key = msg.reply("Here: 42").idempotency_key
        assert key is not None and key != received("<q2@p>").reply("Here: 42").idempotency_key
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [first, other]


async def test_concurrent_sends_with_one_key_mail_once(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        message = SendMessage(content="once", recipient=ANN, idempotency_key="k")
        ids = await asyncio.gather(*(outbox.send(message) for _ in range(5)))
        assert len(set(ids)) == 1
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 1, 0.3)
    [got] = smtp_server.messages
    assert got.message()["Message-ID"] == ids[0]
    assert len(rows(config)) == 1


async def test_a_key_whose_send_failed_fails_again_without_sending(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.reject_recipient("gone@people.example", "550 5.1.1 mailbox unavailable")
    message = SendMessage(content="x", recipient="gone@people.example", idempotency_key="k")
    async with running_outbox(config) as outbox:
        with pytest.raises(SendError) as first:
            await outbox.send(message)
        with pytest.raises(SendError) as again:
            await outbox.send(message)
        assert outbox.metrics.get("outbound.failed") == 1  # one SMTP attempt, not two
    assert again.value.code == first.value.code == "recipient_refused"
    assert again.value.message_id == first.value.message_id
    assert again.value.smtp_code == 550 and "mailbox unavailable" in str(again.value)
    assert [(r["state"], r["attempts"]) for r in rows(config)] == [("failed", 1)]


async def test_a_bad_key_is_refused_before_anything_is_stored(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        for key in ("", "k" * 513):
            with pytest.raises(SendError) as info:
                await outbox.send(SendMessage(content="x", recipient=ANN, idempotency_key=key))
            assert info.value.code == "bad_input"
    assert rows(config) == [] and smtp_server.messages == []


async def test_reply_durable_hook_runs_after_the_row_is_committed(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    seen: list[tuple[str, list[str]]] = []

    async def on_reply_durable(parent_id: str) -> None:
        # What another connection sees at this moment: the reply's row is on disk.
        seen.append((parent_id, [r["message_id"] for r in rows(config)]))

    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), on_reply_durable=on_reply_durable)
        await outbox.start()
        try:
            await seed_ledger(store, config, message_id="<q1@people.example>", sender=ANN,
                              subject="Numbers")  # fmt: skip
            mid = await outbox.send(received().reply("answer"))
            assert seen == [("<q1@people.example>", [mid])]
            await outbox.send(received().reply("answer"))  # a repeat acks again (harmless)
            assert [p for p, _ in seen] == ["<q1@people.example>"] * 2
            await outbox.send(SendMessage(content="new topic", recipient="new@people.example"))
            assert len(seen) == 2  # no parent, nothing to acknowledge
        finally:
            await outbox.close()


async def test_a_failing_ack_hook_does_not_stop_the_reply(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)

    async def broken(_parent_id: str) -> None:
        raise RuntimeError("ledger unavailable")

    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), on_reply_durable=broken)
        await outbox.start()
        try:
            mid = await outbox.send(received().reply("answer"))
        finally:
            await outbox.close()
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [mid]


async def test_sent_is_on_disk_when_send_returns(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """The mark is committed as soon as the server accepted, not on a timer: a kill
    right after send() returned resends nothing."""
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        for i in range(3):
            await outbox.send(SendMessage(content=f"n{i}", recipient=ANN))
            assert [r["state"] for r in rows(config)] == ["sent"] * (i + 1)


async def test_a_first_release_state_dir_gains_the_key_column(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    config.state_dir.mkdir()
    shutil.copy(V1_STATE, config.state_dir / DB_NAME)
    async with running_outbox(config) as outbox:
        message = SendMessage(content="x", recipient=ANN, idempotency_key="after-upgrade")
        first = await outbox.send(message)
        assert await outbox.send(message) == first
    with sqlite3.connect(config.state_dir / DB_NAME) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
    assert "outbox_idempotency_key" in names
    assert len(smtp_server.messages) == 1


async def test_retrying_a_cancelled_keyed_send_mails_once(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    """The host's send timed out mid-exchange and it sends again: one mail, one id."""
    config, p = via_proxy(tmp_path, smtp_server, proxy)
    async with running_outbox(config) as outbox:
        message = received().reply("the answer")
        p.freeze()  # the server stalls: the host's timeout fires
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(outbox.send(message), timeout=0.5)
        assert len(rows(config)) == 1
        p.thaw()
        again = await asyncio.wait_for(outbox.send(message), timeout=10)
        await asyncio.wait_for(outbox.wait_idle(), timeout=15)  # the lease ran out: resent
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 1, 0.3)
    [got] = smtp_server.messages
    assert got.message()["Message-ID"] == again
    assert [r["message_id"] for r in rows(config)] == [again]
