"""hermes-agent end to end: real Dovecot + aiosmtpd, hermes' real plugin loader, platform
registry, config loader and adapter base (its handle_message / session / delivery path).

No LLM: a stand-in message handler answers the way hermes' gateway runner does
(it returns the reply text; the adapter base sends it anchored on the mail).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "hermes_cli", reason='the hermes extra is not installed (pip install -e ".[test,hermes]")'
)

import yaml
from gateway.config import Platform, load_gateway_config
from gateway.platform_registry import platform_registry
from gateway.platforms.base import MessageEvent
from gateway.session import build_session_key
from gateway.status import read_runtime_status
from hermes_cli.plugins import discover_plugins

from prx_channel_email.integrations.hermes import NAME, PrxEmailAdapter
from tests.integration_helpers import (
    STRANGER,
    accounts_host_table,
    assert_threaded,
    host_table,
    mail,
    nth_mail,
    our_pending_tasks,
    plain_body,
)
from tests.outbound_helpers import ANN
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer


@pytest.fixture
def hermes_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "hermes"
    home.mkdir()
    monkeypatch.setenv("HERMES_HOME", str(home))
    yield home


def adapter_from_config(home: Path, extra: dict[str, Any]) -> PrxEmailAdapter:
    """What `hermes gateway` does: load enabled plugins, read config.yaml, build the adapter."""
    config = {
        "plugins": {"enabled": [NAME]},
        # hermes' own keys mixed into extra are ignored by the integration.
        "platforms": {NAME: {"enabled": True, "extra": {**extra, "group_sessions_per_user": True}}},
    }
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    discover_plugins(force=True)
    gateway_config = load_gateway_config()
    platform_config = gateway_config.platforms[Platform(NAME)]
    adapter = platform_registry.create_adapter(NAME, platform_config)
    assert isinstance(adapter, PrxEmailAdapter)
    return adapter


class EchoHandler:
    """Stands in for the gateway runner's message handler (the agent)."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[MessageEvent] = asyncio.Queue()

    async def __call__(self, event: MessageEvent) -> str:
        await self.seen.put(event)
        return f"echo: {event.text.splitlines()[-1]}"

    async def next(self) -> MessageEvent:
        return await asyncio.wait_for(self.seen.get(), timeout=30)


async def test_email_thread_is_one_hermes_session_with_threaded_echo_replies(
    tmp_path: Path,
    hermes_home: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
) -> None:
    adapter = adapter_from_config(hermes_home, host_table(tmp_path, smtp_server, dovecot, account))
    handler = EchoHandler()
    adapter.set_message_handler(handler)
    assert await asyncio.wait_for(adapter.connect(), timeout=30)
    try:
        assert adapter.is_connected and not adapter.has_fatal_error

        # A stranger's mail first, then Ann's: only Ann's ever reaches hermes.
        dovecot.deliver(account, mail("<s1@elsewhere.example>", "Hi", "let me in",
                                      sender=STRANGER), mail_from=STRANGER)  # fmt: skip
        dovecot.deliver(account, mail("<h1@people.example>", "Budget", "What is left?"),
                        mail_from=ANN)  # fmt: skip
        first = await handler.next()
        assert first.message_id == "<h1@people.example>"
        assert first.reply_to_message_id is None
        assert first.text.startswith("Subject: Budget")
        assert first.source.chat_id == ANN and first.source.user_id == ANN
        assert first.metadata["sender_verified"] is None

        reply1 = await nth_mail(smtp_server, 1)
        assert_threaded(reply1, parent="<h1@people.example>", references=["<h1@people.example>"])
        assert reply1["Subject"] == "Re: Budget"
        assert "echo: What is left?" in plain_body(reply1)

        refs = ["<h1@people.example>", reply1["Message-ID"]]
        dovecot.deliver(account, mail("<h2@people.example>", "Re: Budget", "And next month?",
                                      refs=refs, attachment=("plan.txt", b"plan\n")),
                        mail_from=ANN)  # fmt: skip
        second = await handler.next()
        assert second.reply_to_message_id == reply1["Message-ID"]
        assert build_session_key(second.source) == build_session_key(first.source)
        assert not second.text.startswith("Subject:")
        assert [Path(p).read_bytes() for p in second.media_urls] == [b"plan\n"]
        reply2 = await nth_mail(smtp_server, 2)
        assert_threaded(
            reply2, parent="<h2@people.example>", references=[*refs, "<h2@people.example>"]
        )

        # A proactive send (cron, send_message tool): no reply_to, threads onto the
        # latest mail, and the SendResult carries the new Message-ID.
        result = await adapter.send(ANN, "Reminder: budget review on Friday")
        assert result.success
        reply3 = await nth_mail(smtp_server, 3)
        assert result.message_id == reply3["Message-ID"]
        assert_threaded(
            reply3, parent="<h2@people.example>", references=[*refs, "<h2@people.example>"]
        )

        # A refused recipient is a failed, non-retryable SendResult.
        smtp_server.script_rcpt(["550 5.1.1 no such user"])
        refused = await adapter.send(ANN, "this one bounces")
        assert not refused.success and not refused.retryable
        assert handler.seen.empty()  # the stranger never reached hermes
        assert await adapter.get_chat_info(ANN) == {"name": ANN, "type": "dm", "chat_id": ANN}
    finally:
        await asyncio.wait_for(adapter.disconnect(), timeout=30)
    # Stop is clean: disconnected, no fatal error, nothing left running.
    assert not adapter.is_connected and not adapter.has_fatal_error
    assert our_pending_tasks() == []
    assert len(smtp_server.messages) == 3


async def test_a_wrong_password_is_a_fatal_non_retryable_state(
    tmp_path: Path,
    hermes_home: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
) -> None:
    extra = {**host_table(tmp_path, smtp_server, dovecot, account), "password": "wrong"}
    adapter = adapter_from_config(hermes_home, extra)
    assert not await asyncio.wait_for(adapter.connect(), timeout=30)
    assert adapter.has_fatal_error and not adapter.fatal_error_retryable
    assert adapter.fatal_error_code == "auth_failed"
    status = read_runtime_status()
    assert status is not None
    assert status["platforms"][NAME]["state"] == "fatal"
    assert status["platforms"][NAME]["error_code"] == "auth_failed"
    assert "wrong" not in (adapter.fatal_error_message or "")
    await adapter.disconnect()


async def test_a_bad_setting_is_reported_by_connect(
    tmp_path: Path,
    hermes_home: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
) -> None:
    extra = {**host_table(tmp_path, smtp_server, dovecot, account), "smtpPort": "not a port"}
    adapter = adapter_from_config(hermes_home, extra)
    assert not await adapter.connect()
    assert adapter.fatal_error_code == "config_invalid" and not adapter.fatal_error_retryable
    assert "smtp_port" in (adapter.fatal_error_message or "")


async def test_a_failure_while_connected_becomes_hermes_fatal_state(
    tmp_path: Path,
    hermes_home: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
) -> None:
    """The folder disappears while connected: hermes' fatal-error handler is told, with
    a non-retryable code, as for its own platforms."""
    dovecot.create_folder(account, "Work")
    extra = {**host_table(tmp_path, smtp_server, dovecot, account), "imapFolder": "Work"}
    adapter = adapter_from_config(hermes_home, extra)
    told = asyncio.Event()

    async def on_fatal(failed: Any) -> None:
        told.set()

    adapter.set_fatal_error_handler(on_fatal)
    assert await asyncio.wait_for(adapter.connect(), timeout=30)
    try:
        dovecot.delete_folder(account, "Work")
        dovecot.kick(account)
        await asyncio.wait_for(told.wait(), timeout=60)
        assert adapter.fatal_error_code == "folder_missing" and not adapter.fatal_error_retryable
        assert not adapter.is_connected
    finally:
        await adapter.disconnect()


async def test_a_mail_hermes_did_not_finish_comes_again_after_a_reconnect(
    tmp_path: Path,
    hermes_home: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
) -> None:
    """At least once to the host: a message hermes processed (even without an answer)
    is acknowledged; one whose processing was cancelled by a stop comes again."""
    extra = host_table(tmp_path, smtp_server, dovecot, account)
    seen: asyncio.Queue[MessageEvent] = asyncio.Queue()
    never = asyncio.Event()

    async def agent(event: MessageEvent) -> str | None:
        await seen.put(event)
        if event.message_id == "<b2@people.example>":
            await never.wait()  # still thinking when the gateway stops
        return None  # handled, nothing to say

    adapter = adapter_from_config(hermes_home, extra)
    adapter.set_message_handler(agent)
    assert await asyncio.wait_for(adapter.connect(), timeout=30)
    try:
        dovecot.deliver(account, mail("<b1@people.example>", "One", "done"), mail_from=ANN)
        assert (await asyncio.wait_for(seen.get(), 30)).message_id == "<b1@people.example>"
        dovecot.deliver(account, mail("<b2@people.example>", "Two", "pending"), mail_from=ANN)
        pending = await asyncio.wait_for(seen.get(), 30)
        assert pending.message_id == "<b2@people.example>"
        assert pending.metadata["redelivered"] is False
    finally:
        await adapter.cancel_background_tasks()  # what hermes' runner does on shutdown
        await adapter.disconnect()

    adapter = adapter_from_config(hermes_home, extra)
    adapter.set_message_handler(agent)
    never.set()
    assert await asyncio.wait_for(adapter.connect(), timeout=30)
    try:
        again = await asyncio.wait_for(seen.get(), 30)
        assert again.message_id == "<b2@people.example>"
        assert again.metadata["redelivered"] is True
        dovecot.deliver(account, mail("<b3@people.example>", "Three", "new"), mail_from=ANN)
        # Handed on in order: had "<b1>" come again, it would be here first.
        assert (await asyncio.wait_for(seen.get(), 30)).message_id == "<b3@people.example>"
    finally:
        await adapter.disconnect()
    assert smtp_server.messages == []


async def test_several_accounts_through_one_platform_answer_from_the_address_written_to(
    tmp_path: Path, hermes_home: Path, smtp_server: SmtpServer, dovecot: DovecotServer
) -> None:
    support, billing = dovecot.add_user(), dovecot.add_user()
    table = accounts_host_table(
        tmp_path, smtp_server, dovecot, {"support": support, "billing": billing}
    )
    adapter = adapter_from_config(hermes_home, table)
    handler = EchoHandler()
    adapter.set_message_handler(handler)
    assert await asyncio.wait_for(adapter.connect(), timeout=30)
    try:
        dovecot.deliver(support, mail("<hs@people.example>", "Help", "It broke"),
                        mail_from=ANN)  # fmt: skip
        first = await handler.next()
        dovecot.deliver(billing, mail("<hb@people.example>", "Invoice", "Where is it?"),
                        mail_from=ANN)  # fmt: skip
        second = await handler.next()
        assert (first.source.chat_id, second.source.chat_id) == (
            f"support:{ANN}",
            f"billing:{ANN}",
        )
        assert build_session_key(first.source) != build_session_key(second.source)
        replies = [await nth_mail(smtp_server, n) for n in (1, 2)]
        result = await adapter.send(f"billing:{ANN}", "Paid, thanks")
        assert result.success
        replies.append(await nth_mail(smtp_server, 3))
        assert [(r["Subject"], r["From"]) for r in replies] == [
            ("Re: Help", support.address),
            ("Re: Invoice", billing.address),
            ("Re: Invoice", billing.address),
        ]
        assert [m.rcpt_tos for m in smtp_server.messages] == [(ANN,)] * 3
    finally:
        await adapter.disconnect()
