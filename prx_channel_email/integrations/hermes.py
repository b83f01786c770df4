"""hermes-agent integration: the email channel as a hermes gateway platform ``prx_email``.

``pip install "prx-channel-email[hermes]"`` declares this module in hermes' plugin
entry-point group ``hermes_agent.plugins``; enable it with ``plugins.enabled:
[prx_email]`` and configure it under ``platforms.prx_email.extra`` in config.yaml
(EmailConfig field names; ``PRX_EMAIL_*`` overrides). What maps to what:

- every mail of one email thread is one hermes session (a DM whose ``chat_id`` is the
  person's reply address and whose ``thread_id`` is the thread's first Message-ID);
- ``MessageEvent.message_id`` is the Message-ID, ``reply_to_message_id`` the In-Reply-To;
  the first mail of a thread carries its subject in the text; saved attachments are media;
- ``send(chat_id, content, reply_to=...)`` answers in that mail's thread and returns
  a ``SendResult`` with the new Message-ID; without ``reply_to`` it threads onto the
  person's latest mail; a permanent failure is a non-retryable failed SendResult;
- ``connect()`` returns within 30 s: False on a failed login, with a non-retryable
  fatal error for permanent causes (wrong password, untrusted certificate, ...);
- several accounts (an ``accounts`` table in ``extra``) are served by this one
  platform: ``chat_id`` is then ``<account>:<address>``, so an answer leaves from the
  address written to; one account failing for good is logged while the others serve.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import Platform, PlatformConfig
from gateway.platforms.base import (
    BasePlatformAdapter,
    MessageEvent,
    MessageType,
    ProcessingOutcome,
    SendResult,
)

from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError, ConfigError, NotReadyError
from prx_channel_email.models import ChannelMessage
from prx_channel_email.status import ChannelState, ChannelStatus

from ._bridge import (
    EmailBridge,
    accounts_from_host_table,
    build_send,
    inbound_metadata,
    inbound_text,
    snake_case,
)

log = logging.getLogger(__name__)

NAME = "prx_email"
# connect() must answer within hermes' platform budget (30 s); closing takes the rest.
CONNECT_BUDGET_SECS = 25.0


def _message_id(value: Any) -> str | None:
    """Only a real Message-ID threads a reply; other platforms' ids do not."""
    if isinstance(value, str) and value.startswith("<") and value.endswith(">"):
        return value
    return None


def email_accounts(platform: PlatformConfig) -> dict[str, EmailConfig]:
    """The accounts from ``platforms.prx_email.extra`` (hermes' own keys ignored)."""
    return accounts_from_host_table(
        platform.extra or {}, only_known=True, source=f"platforms.{NAME}.extra"
    )


def _ignored_keys(platform: PlatformConfig) -> list[str]:
    """Keys of ``extra`` that are not EmailConfig fields: hermes' own, or a typo."""
    fields = EmailConfig.model_fields
    return sorted(
        str(k)
        for k in (platform.extra or {})
        if snake_case(str(k)) not in fields and not str(k).startswith("_") and k != "accounts"
    )


class PrxEmailAdapter(BasePlatformAdapter):
    """An email account as a hermes platform: IMAP IDLE in, threaded SMTP replies out."""

    supports_code_blocks = True  # Markdown replies get an HTML alternative

    def __init__(self, config: PlatformConfig) -> None:
        super().__init__(config, Platform(NAME))
        self._bridge: EmailBridge | None = None
        self._account: str | None = None
        # Read by hermes' authorization: "allowlist" means our allowed_senders decided.
        self._dm_policy = "allowlist"

    @property
    def enforces_own_access_policy(self) -> bool:
        # Mail from senders outside allowed_senders never becomes a MessageEvent.
        return True

    async def connect(self, *, is_reconnect: bool = False) -> bool:
        ignored = _ignored_keys(self.config)
        if ignored:  # named once, so a misspelt setting does not go unnoticed
            log_event(log, logging.INFO, "hermes.extra_keys_ignored", keys=",".join(ignored))
        try:
            accounts = email_accounts(self.config)
        except ConfigError as exc:
            self._set_fatal_error(exc.code, str(exc), retryable=False)
            return False
        # "*" lets everyone write: hermes then still wants its own allow-all opt-in.
        anyone = any("*" in c.allowed_senders for c in accounts.values())
        self._dm_policy = "open" if anyone else "allowlist"
        bridge = EmailBridge(accounts, self._on_mail, host="hermes", on_status=self._status)
        try:
            await bridge.start(CONNECT_BUDGET_SECS)
        except NotReadyError as exc:  # still trying: hermes may call connect() again later
            self._set_fatal_error(exc.code, f"{exc.code}: {exc}", retryable=True)
            return False
        except ChannelError as exc:  # wrong password, untrusted certificate, ...
            self._set_fatal_error(exc.code, f"{exc.code}: {exc}", retryable=False)
            return False
        self._bridge = bridge
        self._account = bridge.config.account
        self._mark_connected()
        return True

    async def _status(self, status: ChannelStatus) -> None:
        # After connect(): a failure that needs someone to act (the password was changed,
        # the folder deleted) becomes hermes' fatal state, as for its own platforms.
        bridge = self._bridge
        if bridge is None or status.state is not ChannelState.FAILED:
            return
        if bridge.several and not bridge.all_failed():
            return  # one account of several: logged, the others serve on
        code = status.code or "failed"
        self._set_fatal_error(code, f"{code}: {status.message or ''}", retryable=False)
        await self._notify_fatal_error()

    async def disconnect(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.close()
        self._mark_disconnected()

    async def _on_mail(self, message: ChannelMessage) -> None:
        saved = [a for a in message.attachments if a.path is not None]
        bridge = self._bridge
        source = self.build_source(
            chat_id=bridge.chat_id(message) if bridge is not None else message.reply_target,
            chat_name=message.sender_display or message.sender,
            chat_type="dm",
            user_id=message.sender,
            user_name=message.sender_display,
            thread_id=message.thread_ts,
            chat_topic=message.subject or None,
            message_id=message.id,
        )
        event = MessageEvent(
            text=inbound_text(message),
            message_type=MessageType.TEXT,
            source=source,
            raw_message=message,
            message_id=message.id,
            media_urls=[str(a.path) for a in saved],
            media_types=[a.content_type for a in saved],
            reply_to_message_id=message.in_reply_to,
            metadata=inbound_metadata(message),
            timestamp=datetime.fromtimestamp(message.timestamp, tz=UTC),
        )
        await self.handle_message(event)

    async def on_processing_complete(self, event: MessageEvent, outcome: ProcessingOutcome) -> None:
        # Handled (answered or not): the mail is not handed on again after a restart.
        # A failed turn stays unacknowledged, so a restarted gateway sees it again.
        if outcome == ProcessingOutcome.SUCCESS and self._bridge is not None:
            message_id = _message_id(event.message_id)
            account = (event.metadata or {}).get("account")
            if message_id is not None:
                await self._bridge.ack(message_id, account if isinstance(account, str) else None)

    async def send(
        self,
        chat_id: str,
        content: str,
        reply_to: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SendResult:
        return await self._send(chat_id, content, reply_to, metadata, [])

    async def send_document(
        self,
        chat_id: str,
        file_path: str,
        caption: str | None = None,
        file_name: str | None = None,
        reply_to: str | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SendResult:
        return await self._send(chat_id, caption or "", reply_to, metadata, [Path(file_path)])

    async def send_image_file(
        self,
        chat_id: str,
        image_path: str,
        caption: str | None = None,
        reply_to: str | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SendResult:
        return await self._send(chat_id, caption or "", reply_to, metadata, [Path(image_path)])

    async def _send(
        self,
        chat_id: str,
        content: str,
        reply_to: str | None,
        metadata: dict[str, Any] | None,
        files: list[Path],
    ) -> SendResult:
        bridge = self._bridge
        if bridge is None:
            return SendResult(success=False, error="prx_email is not connected", retryable=False)
        meta = metadata or {}
        account, recipient = bridge.send_target(chat_id)
        message = build_send(
            host="hermes",
            content=content,
            recipient=recipient,
            account=account if bridge.several else None,
            parent=_message_id(reply_to),
            thread=_message_id(meta.get("thread_id")),
            attachments=files,
        )
        try:
            message_id = await bridge.send(message)
        except ChannelError as exc:
            # Transient SMTP trouble never gets here (the outbox queues and retries it),
            # so hermes must not retry: the reason is in the error.
            return SendResult(success=False, error=f"{exc.code}: {exc}", retryable=False)
        return SendResult(success=True, message_id=message_id)

    async def send_private_notice(
        self,
        chat_id: str,
        user_id: str | None,
        content: str,
        reply_to: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SendResult:
        # hermes' operational notices ("no home channel is set, type /sethome", ...) are
        # chat UI for an operator; mailed, they would reach every person starting a thread.
        log_event(log, logging.INFO, "hermes.notice_not_mailed", account=self._account,
                  notice=content[:80])  # fmt: skip
        return SendResult(success=True)

    async def get_chat_info(self, chat_id: str) -> dict[str, Any]:
        return {"name": chat_id, "type": "dm", "chat_id": chat_id}


def _configured(platform: PlatformConfig) -> bool:
    try:
        email_accounts(platform)
    except ChannelError:
        return False
    return True


def _yaml_defaults(yaml_cfg: dict[str, Any], platform_cfg: dict[str, Any]) -> dict[str, Any]:
    """Seed ``extra`` from config.yaml: notices go the "private" way (see send_private_notice)."""
    extra = platform_cfg.get("extra")
    chosen = "notice_delivery" in platform_cfg or (
        isinstance(extra, dict) and "notice_delivery" in extra
    )
    return {} if chosen else {"notice_delivery": "private"}


def register(ctx: Any) -> None:
    """hermes plugin entry point: register the ``prx_email`` platform and its mailbox tools."""
    from .hermes_tools import register_tools

    register_tools(ctx)
    ctx.register_platform(
        name=NAME,
        label="Email (prx-channel-email)",
        adapter_factory=PrxEmailAdapter,
        check_fn=lambda: True,
        is_connected=_configured,
        apply_yaml_config_fn=_yaml_defaults,
        install_hint='pip install "prx-channel-email[hermes]"',
        emoji="📧",
        platform_hint=(
            "You are answering email. Write complete, self-contained replies; "
            "Markdown is rendered for the reader. Each email thread is its own conversation."
        ),
    )
