"""nanobot end to end: real Dovecot + aiosmtpd, nanobot's real MessageBus and ChannelManager.

No LLM: a stand-in agent consumes the bus's inbound queue and answers the way
nanobot's agent loop does (same channel and chat, the inbound metadata copied, a
TurnCompleted event after the turn).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "nanobot", reason='the nanobot extra is not installed (pip install -e ".[test,nanobot]")'
)

from nanobot.bus.events import InboundMessage, OutboundMessage
from nanobot.bus.outbound_events import ProgressEvent
from nanobot.bus.queue import MessageBus
from nanobot.bus.runtime_events import RuntimeEventContext, TurnCompleted
from nanobot.channels.manager import ChannelManager
from nanobot.config.schema import Config

from prx_channel_email.errors import SendError
from prx_channel_email.integrations.nanobot import NAME, PrxEmailChannel, register
from tests.integration_helpers import (
    STRANGER,
    accounts_host_table,
    assert_threaded,
    host_table,
    mail,
    nth_mail,
    our_pending_tasks,
    plain_body,
    wait_until,
)
from tests.outbound_helpers import ANN
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer


class EchoAgent:
    """Stands in for nanobot's AgentLoop: every inbound message gets an echo reply."""

    def __init__(self, bus: MessageBus, *, send_back_media: bool = False) -> None:
        self.bus = bus
        self.seen: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self.send_back_media = send_back_media
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.bus.consume_inbound()
            await self.seen.put(msg)
            await self.bus.publish_outbound(
                OutboundMessage(
                    channel=msg.channel,
                    chat_id=msg.chat_id,
                    content=f"echo: {msg.content.splitlines()[-1]}",
                    media=list(msg.media) if self.send_back_media else [],
                    metadata=dict(msg.metadata),
                )
            )
            ctx = RuntimeEventContext(
                channel=msg.channel,
                chat_id=msg.chat_id,
                session_key=msg.session_key,
                metadata=dict(msg.metadata),
            )
            await self.bus.publish(TurnCompleted(context=ctx))

    async def next(self) -> InboundMessage:
        return await asyncio.wait_for(self.seen.get(), timeout=30)


def nanobot_manager(bus: MessageBus, tmp_path: Path, table: dict[str, Any]) -> ChannelManager:
    """nanobot's ChannelManager for a config whose channels table holds ``table``."""
    register()
    section = {"enabled": True, "allowFrom": ["*"], "sendProgress": True, **table}
    # websocket is nanobot's default-on channel; these tests run the email channel alone.
    config = Config.model_validate({"channels": {NAME: section, "websocket": {"enabled": False}}})
    return ChannelManager(config, bus, config_path=tmp_path / "config.json")


@contextlib.asynccontextmanager
async def running(manager: ChannelManager) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(manager.start_all())
    try:
        yield task
    finally:
        await asyncio.wait_for(manager.stop_all(), timeout=30)
        await asyncio.wait_for(task, timeout=30)


def status(manager: ChannelManager) -> dict[str, Any]:
    result: dict[str, Any] = manager.get_status()[NAME]
    return result


async def test_email_thread_is_one_session_with_threaded_echo_replies(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    bus = MessageBus()
    manager = nanobot_manager(bus, tmp_path, host_table(tmp_path, smtp_server, dovecot, account))
    assert isinstance(manager.get_channel(NAME), PrxEmailChannel)
    agent = EchoAgent(bus, send_back_media=True)
    try:
        async with running(manager) as started:
            await wait_until(lambda: status(manager)["state"] == "running")

            # A stranger's mail first, then Ann's: only Ann's ever reaches the bus.
            dovecot.deliver(account, mail("<s1@elsewhere.example>", "Hi", "let me in",
                                          sender=STRANGER), mail_from=STRANGER)  # fmt: skip
            dovecot.deliver(account, mail("<m1@people.example>", "Weekly report",
                                          "Can you send it?"), mail_from=ANN)  # fmt: skip
            first = await agent.next()
            assert first.sender_id == ANN and first.chat_id == ANN
            assert first.session_key == f"{NAME}:<m1@people.example>"
            assert first.content.startswith("Subject: Weekly report")
            assert first.metadata["message_id"] == "<m1@people.example>"
            assert first.metadata["thread_ts"] == "<m1@people.example>"
            assert "sender_verified" in first.metadata

            reply1 = await nth_mail(smtp_server, 1)
            assert_threaded(
                reply1, parent="<m1@people.example>", references=["<m1@people.example>"]
            )
            assert reply1["Subject"] == "Re: Weekly report"
            assert "echo: Can you send it?" in plain_body(reply1)

            # The answer, with a file: same session, no subject line, the file as media.
            refs = ["<m1@people.example>", reply1["Message-ID"]]
            dovecot.deliver(account, mail("<m2@people.example>", "Re: Weekly report", "Thanks!",
                                          refs=refs, attachment=("notes.txt", b"numbers\n")),
                            mail_from=ANN)  # fmt: skip
            second = await agent.next()
            assert second.session_key == first.session_key
            assert not second.content.startswith("Subject:")
            assert len(second.media) == 1 and Path(second.media[0]).read_bytes() == b"numbers\n"
            reply2 = await nth_mail(smtp_server, 2)
            assert_threaded(
                reply2, parent="<m2@people.example>", references=[*refs, "<m2@people.example>"]
            )
            attached = [p.get_filename() for p in reply2.iter_attachments()]
            assert attached == ["notes.txt"]

            # A proactive send (no metadata, as a cron job or heartbeat sends) threads
            # onto Ann's latest mail.
            await bus.publish_outbound(OutboundMessage(channel=NAME, chat_id=ANN,
                                                       content="Reminder: report due"))  # fmt: skip
            reply3 = await nth_mail(smtp_server, 3)
            assert_threaded(
                reply3, parent="<m2@people.example>", references=[*refs, "<m2@people.example>"]
            )
            assert agent.seen.empty()  # the stranger never reached the bus

        # Stop is clean: the manager's start task ended, the channel reports stopped.
        assert started.done() and not started.cancelled()
        assert status(manager)["state"] == "stopped"
        assert not manager.get_channel(NAME).is_running  # type: ignore[union-attr]
        assert our_pending_tasks() == []
    finally:
        agent.task.cancel()
        await asyncio.gather(agent.task, return_exceptions=True)
    assert [m.rcpt_tos for m in smtp_server.messages] == [(ANN,)] * 3


async def test_a_refused_recipient_is_not_retried_and_progress_is_not_mailed(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    bus = MessageBus()
    manager = nanobot_manager(bus, tmp_path, host_table(tmp_path, smtp_server, dovecot, account))
    channel = manager.get_channel(NAME)
    assert channel is not None
    assert not channel.should_retry_send_error(SendError("550 no such user", code="rejected"))
    async with running(manager):
        await wait_until(lambda: status(manager)["state"] == "running")
        # Progress lines and tool hints are chat UI: never mailed, even with sendProgress on.
        await bus.publish_event(ProgressEvent(content="thinking..."), channel=NAME, chat_id=ANN)
        await bus.publish_event(ProgressEvent(content='read_file("x")', tool_hint=True),
                                channel=NAME, chat_id=ANN)  # fmt: skip
        smtp_server.script_rcpt(["550 5.1.1 no such user"])  # the next RCPT only
        await bus.publish_outbound(OutboundMessage(channel=NAME, chat_id=ANN, content="first"))
        await bus.publish_outbound(OutboundMessage(channel=NAME, chat_id=ANN, content="second"))
        # The manager sends one chat's messages in order: had it retried "first", the
        # retry (which the server would now accept) would arrive before "second".
        assert "second" in plain_body(await nth_mail(smtp_server, 1))
    assert len(smtp_server.messages) == 1


async def test_a_wrong_password_shows_as_a_failed_channel(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    table = {**host_table(tmp_path, smtp_server, dovecot, account), "password": "wrong"}
    manager = nanobot_manager(MessageBus(), tmp_path, table)
    async with running(manager) as started:
        await asyncio.wait_for(asyncio.shield(started), timeout=60)
        state = status(manager)
        assert state["state"] == "failed"
        assert state["error"].startswith("auth_failed")
        assert "wrong" not in state["error"]


async def test_a_bad_table_fails_start_with_every_bad_field_named(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    table = {**host_table(tmp_path, smtp_server, dovecot, account), "imapPrt": 1, "smtpPort": "x"}
    manager = nanobot_manager(MessageBus(), tmp_path, table)
    async with running(manager) as started:
        await asyncio.wait_for(asyncio.shield(started), timeout=30)
        error = status(manager)["error"]
        assert error.startswith("config_invalid") and "imapPrt" in error and "smtp_port" in error
        assert account.password not in error


async def test_a_failure_while_running_shows_as_a_failed_channel(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    """The folder disappears while the channel runs: retrying cannot help, so nanobot
    shows the channel as failed, with the reason (not "running", not silence)."""
    dovecot.create_folder(account, "Work")
    table = {**host_table(tmp_path, smtp_server, dovecot, account), "imapFolder": "Work"}
    manager = nanobot_manager(MessageBus(), tmp_path, table)
    async with running(manager) as started:
        await wait_until(lambda: status(manager)["state"] == "running")
        dovecot.delete_folder(account, "Work")
        dovecot.kick(account)
        await asyncio.wait_for(asyncio.shield(started), timeout=60)
        state = status(manager)
        assert state["state"] == "failed"
        assert state["error"].startswith("folder_missing")


class SilentAgent:
    """An agent loop that answers nothing: it ends the turn of ``handled`` ids (as
    nanobot's loop does, with a TurnCompleted event) and is still thinking about the
    others when the gateway goes down."""

    def __init__(self, bus: MessageBus, handled: set[str]) -> None:
        self.bus = bus
        self.handled = handled
        self.seen: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.bus.consume_inbound()
            if msg.metadata["message_id"] in self.handled:
                ctx = RuntimeEventContext(
                    channel=msg.channel,
                    chat_id=msg.chat_id,
                    session_key=msg.session_key,
                    metadata=dict(msg.metadata),
                )
                await self.bus.publish(TurnCompleted(context=ctx))  # awaits the ack
            await self.seen.put(msg)

    async def next(self) -> InboundMessage:
        return await asyncio.wait_for(self.seen.get(), timeout=30)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_a_mail_whose_turn_never_ended_comes_again_after_a_restart(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    """At least once to the host: a finished turn acknowledges its mail; a mail the
    agent was still on when the gateway stopped is handed on again, flagged."""
    table = host_table(tmp_path, smtp_server, dovecot, account)
    bus = MessageBus()
    manager = nanobot_manager(bus, tmp_path, table)
    agent = SilentAgent(bus, handled={"<a1@people.example>"})
    async with running(manager):
        await wait_until(lambda: status(manager)["state"] == "running")
        dovecot.deliver(account, mail("<a1@people.example>", "One", "done"), mail_from=ANN)
        dovecot.deliver(account, mail("<a2@people.example>", "Two", "pending"), mail_from=ANN)
        first, second = await agent.next(), await agent.next()
        assert [first.metadata["message_id"], second.metadata["message_id"]] == [
            "<a1@people.example>",
            "<a2@people.example>",
        ]
        assert not first.metadata["redelivered"] and not second.metadata["redelivered"]
    await agent.stop()

    bus = MessageBus()
    manager = nanobot_manager(bus, tmp_path, table)
    agent = SilentAgent(bus, handled={"<a2@people.example>"})
    async with running(manager):
        again = await agent.next()
        assert again.metadata["message_id"] == "<a2@people.example>"
        assert again.metadata["redelivered"] is True
        assert again.session_key == f"{NAME}:<a2@people.example>"
        dovecot.deliver(account, mail("<a3@people.example>", "Three", "new"), mail_from=ANN)
        # Mail is handed on in order: had "<a1>" come again, it would be here first.
        assert (await agent.next()).metadata["message_id"] == "<a3@people.example>"
    await agent.stop()
    assert smtp_server.messages == []


async def test_several_accounts_through_one_channel_answer_from_the_address_written_to(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer
) -> None:
    support, billing = dovecot.add_user(), dovecot.add_user()
    table = accounts_host_table(
        tmp_path, smtp_server, dovecot, {"support": support, "billing": billing}
    )
    bus = MessageBus()
    manager = nanobot_manager(bus, tmp_path, table)
    agent = EchoAgent(bus)
    try:
        async with running(manager):
            await wait_until(lambda: status(manager)["state"] == "running")
            dovecot.deliver(support, mail("<s@people.example>", "Help", "It broke"),
                            mail_from=ANN)  # fmt: skip
            first = await agent.next()
            dovecot.deliver(billing, mail("<b@people.example>", "Invoice", "Where is it?"),
                            mail_from=ANN)  # fmt: skip
            second = await agent.next()
            assert (first.chat_id, second.chat_id) == (f"support:{ANN}", f"billing:{ANN}")
            assert first.session_key == f"{NAME}:support:<s@people.example>"
            assert second.session_key == f"{NAME}:billing:<b@people.example>"
            assert (first.metadata["account"], second.metadata["account"]) == (
                "support",
                "billing",
            )
            replies = [await nth_mail(smtp_server, n) for n in (1, 2)]
            # A proactive send to a chat id names its account too.
            await bus.publish_outbound(OutboundMessage(channel=NAME, chat_id=f"billing:{ANN}",
                                                       content="Paid, thanks"))  # fmt: skip
            replies.append(await nth_mail(smtp_server, 3))
        assert [(r["Subject"], r["From"]) for r in replies] == [
            ("Re: Help", support.address),
            ("Re: Invoice", billing.address),
            ("Re: Invoice", billing.address),
        ]
        assert [m.mail_from for m in smtp_server.messages] == [
            support.address,
            billing.address,
            billing.address,
        ]
        assert [m.rcpt_tos for m in smtp_server.messages] == [(ANN,)] * 3
    finally:
        agent.task.cancel()
        await asyncio.gather(agent.task, return_exceptions=True)
