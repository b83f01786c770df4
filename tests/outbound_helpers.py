"""Shared helpers for the outbound tests: configs pointing at the SMTP fixture, ledger seeding."""

from __future__ import annotations

import email
import email.policy
import itertools
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, cast

from prx_channel_email._storage import HandoffBatch, LedgerEntry, MailKey, Record, Storage
from prx_channel_email.config import EmailConfig
from tests.config_builder import build_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer

FROM = "bot@example.test"
ANN = "ann@people.example"


def smtp_config(
    tmp_path: Path,
    smtp_server: SmtpServer,
    *,
    security: Literal["tls", "starttls"] = "tls",
    **overrides: Any,
) -> EmailConfig:
    """An EmailConfig whose SMTP side is the fixture server (IMAP side unused)."""
    fields: dict[str, Any] = {
        "from_address": FROM,
        "connect_timeout_secs": 5.0,
        "command_timeout_secs": 5.0,
    }
    fields.update(overrides)
    return build_config(tmp_path / "state", smtp=smtp_server, smtp_listener=security, **fields)


_UIDS = itertools.count(1)


async def seed_ledger(
    store: Storage,
    config: EmailConfig,
    *,
    message_id: str,
    sender: str,
    subject: str,
    references: list[str] | None = None,
    reply_target: str | None = None,
    received_at: float | None = None,
) -> LedgerEntry:
    """Record an inbound message as delivered, as the sync engine would."""
    refs = references or []
    entry = LedgerEntry(
        message_id=message_id,
        sender=sender,
        reply_target=reply_target or sender,
        subject=subject,
        thread_ts=refs[0] if refs else message_id,
        references=refs,
        received_at=received_at if received_at is not None else time.time(),
    )
    # Each seeded mail is a mail of its own (its own UID), as on a server.
    key = MailKey(config.account, "INBOX", 1, next(_UIDS))
    record = Record(key, message_id, "delivered", entry=entry)
    await store.commit_handoff(HandoffBatch(key.mailbox, records=[record]))
    return entry


def parse(raw: bytes) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(raw, policy=email.policy.default))


def human_mail(
    mid: str, subject: str, body: str = "hi", *, refs: list[str] | None = None, sender: str = ANN
) -> bytes:
    """A plain mail as a person's client would write it (threaded on ``refs`` if given)."""
    lines = [
        f"From: Ann Example <{sender}>",
        f"To: {FROM}",
        f"Subject: {subject}",
        "Date: Mon, 05 Jan 2026 10:00:00 +0000",
        f"Message-ID: {mid}",
    ]
    if refs:
        lines += [f"In-Reply-To: {refs[-1]}", f"References: {' '.join(refs)}"]
    lines += ["Content-Type: text/plain; charset=utf-8", "", body, ""]
    return "\r\n".join(lines).encode()


def dovecot_config(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
    **overrides: Any,
) -> EmailConfig:
    """IMAP side on the Dovecot fixture user, SMTP side on the SMTP fixture."""
    fields: dict[str, Any] = {
        "from_address": FROM,
        "connect_timeout_secs": 5.0,
        "command_timeout_secs": 5.0,
    }
    fields.update(overrides)
    return build_config(
        tmp_path / "state", dovecot=dovecot, account=account, smtp=smtp_server, **fields
    )
