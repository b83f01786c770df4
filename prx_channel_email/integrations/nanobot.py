"""nanobot integration: the email channel as a nanobot ``BaseChannel`` named ``prx_email``.

``pip install "prx-channel-email[nanobot]"``. nanobot 0.3.5 discovers channels only
inside its own package; :func:`register` adds ours to its channel registry for this
process, and ``python -m prx_channel_email.integrations.nanobot gateway`` runs
nanobot's own CLI with it registered. What maps to what:

- one email thread is one nanobot session (``session_key`` = ``prx_email:<thread_ts>``);
  ``chat_id`` is the person's reply address, ``sender_id`` their From address;
- several accounts (an ``accounts`` table in the channel's settings) are served by
  this one channel: ``chat_id`` is then ``<account>:<address>`` and the session key
  ``prx_email:<account>:<thread_ts>``, so an answer leaves from the address written
  to; one account failing for good is logged while the others serve;
- the first mail of a thread carries its subject in the text the agent reads;
- saved attachments are ``media``; Message-ID, thread and ``sender_verified`` are metadata;
- an ``OutboundMessage`` goes out as the threaded reply to the mail its metadata
  names (the agent loop copies the inbound metadata), else onto the person's latest mail;
- ``SendError`` is permanent: the manager never retries it;
- ``start()`` raises on a permanent failure, so the manager shows the channel as failed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from nanobot.bus.events import OutboundMessage
from nanobot.bus.outbound_events import ProgressEvent
from nanobot.bus.queue import MessageBus
from nanobot.bus.runtime_events import TurnCompleted
from nanobot.channels.base import BaseChannel

from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError, SendError
from prx_channel_email.models import ChannelMessage, SendMessage
from prx_channel_email.status import ChannelState, ChannelStatus

from ._bridge import (
    EmailBridge,
    accounts_from_host_table,
    build_send,
    inbound_metadata,
    inbound_text,
    split_chat_id,
)

log = logging.getLogger(__name__)

NAME = "prx_email"
# nanobot's own keys in a channel table; everything else must be an EmailConfig field.
HOST_KEYS = (
    "enabled",
    "allow_from",
    "send_progress",
    "send_tool_hints",
    "show_reasoning",
    "streaming",
)
# start() gives the mailbox this long to log in before it reports "not ready".
READY_TIMEOUT_SECS = 30.0


def _section_table(section: Any) -> dict[str, Any]:
    if isinstance(section, Mapping):
        return dict(section)
    dump = getattr(section, "model_dump", None)  # a pydantic model from a host that parsed it
    if callable(dump):
        return dict(dump())
    raise ChannelError(f"the {NAME} channel table is not a mapping", code="config_invalid")


def email_accounts(section: Any) -> dict[str, EmailConfig]:
    """The accounts of nanobot's ``channels.prx_email`` table: its ``accounts`` table,
    else the table itself as the one account (the channel and its tools read it the
    same way)."""
    table = _section_table(section)
    if "allowed_senders" not in table and "allowedSenders" not in table:
        # A nanobot user's natural allow-list; the channel's own matching rules apply.
        allow = table.get("allowFrom", table.get("allow_from"))
        if allow is not None:
            table["allowed_senders"] = allow
    return accounts_from_host_table(table, host_keys=HOST_KEYS, source=f"channels.{NAME}")


def email_config(section: Any) -> EmailConfig:
    """The (first) account's settings of nanobot's ``channels.prx_email`` table."""
    return next(iter(email_accounts(section).values()))


def thread_session_key(thread_ts: str) -> str:
    """One nanobot session per email thread."""
    return f"{NAME}:{thread_ts}"


def outbound_to_send(msg: OutboundMessage, accounts: Collection[str] = ()) -> SendMessage:
    """The SendMessage for a nanobot reply: threaded on the mail its metadata names,
    from the account its chat id (or, failing that, its metadata) names."""
    meta = msg.metadata or {}
    parent = meta.get("message_id") or msg.reply_to
    thread = meta.get("thread_ts")
    account, recipient = split_chat_id(msg.chat_id, accounts)
    if account is None and meta.get("account") in accounts:
        account = meta["account"]
    return build_send(
        host="nanobot",
        content=msg.content,
        recipient=recipient,
        parent=parent if isinstance(parent, str) else None,
        thread=thread if isinstance(thread, str) else None,
        attachments=[Path(p) for p in msg.media],
        account=account if len(accounts) > 1 else None,
    )


class PrxEmailChannel(BaseChannel):
    """An email account as a nanobot channel (IMAP IDLE in, threaded SMTP replies out)."""

    name = NAME
    display_name = "Email (prx-channel-email)"

    def __init__(self, config: Any, bus: MessageBus) -> None:
        super().__init__(config, bus)
        self._bridge: EmailBridge | None = None
        self._stop = asyncio.Event()
        self._failure: ChannelError | None = None
        self._unsubscribe: Any = None

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {
            "enabled": False,
            "imapHost": "",
            "smtpHost": "",
            "username": "",
            "password": "",
            "fromAddress": "",
            "allowedSenders": [],
        }

    def progress_transport_defaults(self) -> tuple[bool, bool] | None:
        # An email per tool call or progress line would flood the person's inbox.
        return (False, False)

    def is_allowed(self, sender_id: str) -> bool:
        # The channel's policy (allowed_senders, sender_auth) already decided; nanobot's
        # allowFrom would be a second allow-list, and its pairing reply would mail strangers.
        return True

    def should_retry_send_error(self, error: Exception) -> bool:
        # Transient SMTP trouble never reaches here (the outbox queues and retries it).
        return not isinstance(error, SendError)

    def start_error_message(self, error: Exception) -> str | None:
        if isinstance(error, ChannelError):
            return f"{error.code}: {error}"
        return None

    async def start(self) -> None:
        """Log in, then serve until :meth:`stop`; raises ChannelError on a permanent failure."""
        accounts = email_accounts(self.config)
        self._stop.clear()
        self._failure = None
        self._bridge = EmailBridge(accounts, self._publish, host="nanobot", on_status=self._status)
        try:
            await self._bridge.start(READY_TIMEOUT_SECS)
        except BaseException:
            self._bridge = None
            raise
        self._unsubscribe = self.bus.subscribe(self._on_turn_completed, TurnCompleted)
        self._running = True
        try:
            await self._stop.wait()
        finally:
            self._running = False
            await self._shutdown()
        if self._failure is not None:
            raise self._failure  # the manager shows the channel as failed, with the reason

    def _status(self, status: ChannelStatus) -> None:
        # nanobot shows "running" only while is_running: a channel that lost its
        # connection (and keeps retrying) shows "starting" until it is back. A failure
        # that needs someone to act ends start() with it, so nanobot shows "failed".
        bridge = self._bridge
        if bridge is None or self._stop.is_set():
            return
        self._running = bridge.serving()
        # With several accounts, one that fails is logged and the others serve on.
        if status.state is ChannelState.FAILED and (not bridge.several or bridge.all_failed()):
            code = status.code or "failed"
            self._failure = ChannelError(status.message or code, code=code)
            self._stop.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        bridge, self._bridge = self._bridge, None
        self._running = False
        if bridge is not None:
            await bridge.close()

    async def _publish(self, message: ChannelMessage) -> None:
        bridge = self._bridge
        await self._handle_message(
            sender_id=message.sender,
            chat_id=bridge.chat_id(message) if bridge is not None else message.reply_target,
            content=inbound_text(message),
            media=[str(a.path) for a in message.attachments if a.path is not None],
            metadata=inbound_metadata(message),
            session_key=thread_session_key(
                bridge.session(message) if bridge is not None else message.thread_ts
            ),
            is_dm=True,
        )

    async def _on_turn_completed(self, event: TurnCompleted) -> None:
        # A turn that completed without a reply still handled the mail: acknowledge it.
        # A failed one (the model was down) is not: the mail comes again after a restart.
        ctx = event.context
        message_id = ctx.metadata.get("message_id")
        if (
            ctx.channel == self.name
            and event.outcome == "completed"
            and isinstance(message_id, str)
            and self._bridge is not None
        ):
            account = ctx.metadata.get("account")
            await self._bridge.ack(message_id, account if isinstance(account, str) else None)

    async def send(self, msg: OutboundMessage) -> None:
        """Send ``msg`` as threaded mail. Raises SendError (permanent) or ChannelError."""
        if isinstance(msg.event, ProgressEvent):
            return  # progress / tool hints are chat UI, not mail
        if not msg.content.strip() and not msg.media:
            return
        if self._bridge is None:
            raise ChannelError(f"the {NAME} channel is not running", code="not_running")
        message_id = await self._bridge.send(outbound_to_send(msg, self._bridge.accounts))
        log_event(log, logging.INFO, "nanobot.sent", message_id=message_id,
                  in_reply_to=(msg.metadata or {}).get("message_id"))  # fmt: skip


# --------------------------------------------------------------------------- registration


def plugin() -> Any:
    """nanobot's descriptor for this channel (a ``ChannelPlugin``)."""
    from nanobot.channels.plugin import ChannelPlugin

    return ChannelPlugin(
        name=NAME,
        display_name=PrxEmailChannel.display_name,
        runtime="prx_channel_email.integrations.nanobot:PrxEmailChannel",
    )


def register() -> None:
    """Make nanobot's channel registry list ``prx_email`` in this process (idempotent).

    nanobot 0.3.5 finds channels only as packages inside ``nanobot.channels``; this
    adds our descriptor to what its discovery returns, so ``ChannelManager`` builds,
    starts, stops and reports the channel like a built-in one. Nothing is written
    into nanobot's installed files.
    """
    from nanobot.channels import registry

    original = registry.discover_plugins
    if getattr(original, "_prx_email", False):
        return
    descriptor = plugin()

    def discover_plugins(enabled_names: set[str] | None = None) -> dict[str, Any]:
        found = dict(original(enabled_names))
        if enabled_names is None or NAME in enabled_names:
            found.setdefault(NAME, descriptor)
        return found

    discover_plugins._prx_email = True  # type: ignore[attr-defined]
    discover_plugins.__wrapped__ = original  # type: ignore[attr-defined]
    registry.discover_plugins = discover_plugins


def main(argv: list[str] | None = None) -> None:
    """``python -m prx_channel_email.integrations.nanobot``: nanobot's CLI, ``prx_email`` added."""
    register()
    from nanobot.cli.entry import main as nanobot_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    nanobot_main()


if __name__ == "__main__":
    main()
