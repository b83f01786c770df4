"""What every host integration needs from the channel, written once and host-free.

A host adapter (nanobot's BaseChannel, hermes' platform adapter) has to turn the
host's own settings table into the accounts to serve, run ``listen()`` and pump
its queue into the host, learn once that the accounts work (or why they never
will), send threaded mail and acknowledge what the host handled. This module does
those things and imports no host, so the core never depends on one.

Several accounts (an ``accounts`` table in the host's settings) are served by the
host's one channel or platform. The host's chat id then carries the account
(``support:alice@example.com``, see :func:`chat_id`), so that its answer leaves
from the address the person wrote to; with one account it is the bare address,
as it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from prx_channel_email._support.observability import log_event
from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import ACCOUNTS_KEY, EmailConfig, accounts_from_table
from prx_channel_email.errors import ChannelError, NotReadyError
from prx_channel_email.models import ChannelMessage, SendMessage
from prx_channel_email.status import ChannelState, StatusCallback

from ._tools import publish as publish_tools

log = logging.getLogger(__name__)

# How many handed-on messages we remember for a later ack (a host that never acks
# must not grow us without bound; a forgotten one is handed on again after a restart).
INFLIGHT_MAX = 10_000

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(key: str) -> str:
    """``imapHost`` -> ``imap_host``; snake_case keys pass unchanged."""
    return _CAMEL.sub("_", key).lower()


def config_from_host_table(
    table: Mapping[str, Any],
    *,
    host_keys: Collection[str] = (),
    only_known: bool = False,
    source: str | None = None,
) -> EmailConfig:
    """Build the config from a host's table as the user wrote it.

    Keys may be camelCase or snake_case. ``host_keys`` (either spelling) belong to
    the host and are skipped. With ``only_known`` every key that is not an
    EmailConfig field is skipped too (hermes mixes many of its own keys into
    ``extra``); otherwise an unknown key is a ConfigError, so a typo is reported.
    The environment (``PRX_EMAIL_*``) overrides the table, as it overrides a file.
    """
    skip = {snake_case(k) for k in host_keys}
    fields = EmailConfig.model_fields
    kept: dict[str, Any] = {}
    for key, value in table.items():
        name = snake_case(str(key))
        if name in skip or name.startswith("_") or value is None:
            continue
        if only_known and name not in fields:
            continue
        kept[str(key)] = value
    return EmailConfig.from_table(kept, path=source)


def accounts_from_host_table(
    table: Mapping[str, Any],
    *,
    host_keys: Collection[str] = (),
    only_known: bool = False,
    source: str | None = None,
) -> dict[str, EmailConfig]:
    """Every account of a host's table: its ``accounts`` sub-table (each account a
    table of EmailConfig fields inheriting the rest), else the table as the one
    account "default". Host keys are skipped as in :func:`config_from_host_table`."""
    accounts = table.get(ACCOUNTS_KEY)
    if accounts is None:
        return {"default": config_from_host_table(
            table, host_keys=host_keys, only_known=only_known, source=source
        )}  # fmt: skip
    skip = {snake_case(k) for k in host_keys}
    fields = EmailConfig.model_fields
    kept: dict[str, Any] = {}
    for key, value in table.items():
        name = snake_case(str(key))
        if key == ACCOUNTS_KEY or not (
            name in skip or name.startswith("_") or value is None
            or (only_known and name not in fields)
        ):  # fmt: skip
            kept[str(key)] = value
    return accounts_from_table(kept, path=source)


def chat_id(message: ChannelMessage, *, several: bool) -> str:
    """The host's chat id for ``message``: its reply address, with the account in
    front when the host serves several (``support:alice@example.com``)."""
    return f"{message.account}:{message.reply_target}" if several else message.reply_target


def split_chat_id(value: str, accounts: Collection[str]) -> tuple[str | None, str]:
    """(account, address) of a host's chat id; the account is None when it names none
    (a bare address: the account is then the parent's, or the only one)."""
    name, sep, address = value.partition(":")
    if sep and name in accounts:
        return name, address
    return None, value


def session_suffix(message: ChannelMessage, *, several: bool) -> str:
    """What keys a host session: the thread, per account when there are several (one
    thread reaching two accounts is two conversations, answered from two addresses)."""
    return f"{message.account}:{message.thread_ts}" if several else message.thread_ts


def inbound_text(message: ChannelMessage) -> str:
    """What the agent reads: the new text, with the subject on a thread's first mail."""
    first_of_thread = message.thread_ts == message.id and not message.references
    body = message.content or message.full_text
    if first_of_thread and message.subject:
        return f"Subject: {message.subject}\n\n{body}"
    return body


def inbound_metadata(message: ChannelMessage) -> dict[str, Any]:
    """What a host keeps with the message so that its answer can be threaded and judged."""
    skipped = [
        {"filename": a.filename, "reason": a.skipped_reason}
        for a in message.attachments
        if a.path is None
    ]
    meta: dict[str, Any] = {
        "message_id": message.id,
        "thread_ts": message.thread_ts,
        "in_reply_to": message.in_reply_to,
        "subject": message.subject,
        "sender_display": message.sender_display,
        "sender_verified": message.sender_verified,
        "redelivered": message.redelivered,
        "account": message.account,
        "folder": message.folder,
    }
    if skipped:
        meta["skipped_attachments"] = skipped
    return meta


def build_send(
    *,
    host: str,
    content: str,
    recipient: str,
    parent: str | None,
    thread: str | None,
    attachments: list[Path] | None = None,
    account: str | None = None,
) -> SendMessage:
    """A host's answer as a SendMessage; no parent means "onto the person's latest mail".

    Hosts retry a send after an unexpected error: the same answer to the same mail
    gets the same idempotency key, so a retry never mails it twice.
    """
    digest = hashlib.sha256(
        f"{account or ''}\0{parent}\0{recipient}\0{content}".encode()
    ).hexdigest()
    return SendMessage(
        content=content,
        recipient=recipient,
        in_reply_to=parent or None,
        thread_ts=thread or None,
        attachments=attachments or [],
        idempotency_key=f"{host}:{digest[:32]}",
        account=account,
    )


Deliver = Callable[[ChannelMessage], Awaitable[None]]


class EmailBridge:
    """One EmailChannel run for a host: listener, hand-off pump, readiness, sends, acks."""

    def __init__(
        self,
        config: EmailConfig | Mapping[str, EmailConfig],
        deliver: Deliver,
        *,
        host: str,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.accounts = {"default": config} if isinstance(config, EmailConfig) else dict(config)
        self.config = next(iter(self.accounts.values()))
        self.several = len(self.accounts) > 1
        self.channel = EmailChannel(self.accounts, on_status=on_status)
        self._deliver = deliver
        self._host = host
        self._queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        self._listener: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._inflight: OrderedDict[tuple[str, str], ChannelMessage] = OrderedDict()
        self._withdraw_tools: Callable[[], None] | None = None

    async def start(self, ready_within: float) -> None:
        """Start listening; return once every account is ready (IMAP folders selected,
        SMTP logged in), or, with several, once each is ready or failed for good and at
        least one is ready: the failed ones are logged, the others serve.

        Raises ChannelError with the code of a permanent failure (wrong password,
        untrusted certificate, missing folder, ...) as soon as it is known (with
        several accounts: once every one has failed), and NotReadyError when
        ``ready_within`` seconds passed without an outcome. On any raise the channel
        is closed again.
        """
        await self.channel.start()
        self._listener = asyncio.create_task(self.channel.listen(self._queue))
        self._pump = asyncio.create_task(self._run_pump())
        try:
            await self._ready(ready_within)
        except BaseException:
            await self.close()
            raise
        self._withdraw_tools = publish_tools(self.channel.tools)  # the host's tool registry
        log_event(log, logging.INFO, "integration.ready", account=self.config.account,
                  host=self._host, accounts=len(self.accounts))  # fmt: skip

    async def _ready(self, within: float) -> None:
        if not self.several:
            await self.channel.wait_ready(within)
            return
        results = await asyncio.gather(
            *(self.channel.wait_ready(within, account=name) for name in self.accounts),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, ChannelError):
                raise failure
            log_event(log, logging.ERROR, "integration.account_failed", exc=failure,
                      account=failure.account, host=self._host,
                      code=failure.code)  # fmt: skip
        if len(failures) == len(results):
            late = [f for f in failures if isinstance(f, NotReadyError)]
            raise late[0] if late else failures[0]

    def serving(self) -> bool:
        """The channel serves mail: connected (with several accounts: any mailbox is)."""
        if not self.several:
            return self.channel.state.state is ChannelState.CONNECTED
        return any(m.state is ChannelState.CONNECTED for m in self.channel.mailboxes())

    def all_failed(self) -> bool:
        """Every mailbox failed for good: what a host shows as a failed channel."""
        boxes = self.channel.mailboxes()
        return bool(boxes) and all(m.state is ChannelState.FAILED for m in boxes)

    async def _run_pump(self) -> None:
        while True:
            message = await self._queue.get()
            self._remember(message)
            try:
                await self._deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the host refused one message: keep serving the others
                log_event(log, logging.ERROR, "integration.deliver_failed", exc=exc,
                          account=message.account, message_id=message.id,
                          host=self._host)  # fmt: skip

    def _remember(self, message: ChannelMessage) -> None:
        self._inflight[(message.account, message.id)] = message
        while len(self._inflight) > INFLIGHT_MAX:
            self._inflight.popitem(last=False)

    def chat_id(self, message: ChannelMessage) -> str:
        return chat_id(message, several=self.several)

    def session(self, message: ChannelMessage) -> str:
        return session_suffix(message, several=self.several)

    def send_target(self, host_chat_id: str) -> tuple[str | None, str]:
        """(account, recipient) of a host's chat id."""
        return split_chat_id(host_chat_id, self.accounts)

    async def send(self, message: SendMessage) -> str:
        """Send (or durably queue) ``message``; returns its Message-ID. SendError is permanent."""
        message_id = await self.channel.send_message(message)
        if message.in_reply_to:  # a reply acknowledges its parent
            self._forget(message.in_reply_to, message.account)
        return message_id

    async def ack(self, message_id: str, account: str | None = None) -> None:
        """The host handled ``message_id`` without replying: it is not handed on again."""
        message = self._forget(message_id, account)
        if message is not None:
            await self.channel.ack(message)

    def _forget(self, message_id: str, account: str | None) -> ChannelMessage | None:
        if account is not None:
            return self._inflight.pop((account, message_id), None)
        for key in [k for k in self._inflight if k[1] == message_id][:1]:
            return self._inflight.pop(key)
        return None

    async def close(self) -> None:
        """Stop the pump and the listener, then close the channel (idempotent)."""
        withdraw, self._withdraw_tools = self._withdraw_tools, None
        if withdraw is not None:
            withdraw()
        tasks = [t for t in (self._pump, self._listener) if t is not None]
        self._pump = self._listener = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.channel.close()
