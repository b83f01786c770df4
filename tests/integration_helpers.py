"""Shared by the host-integration tests: a channel table for the fixtures, mail with a file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.outbound_helpers import ANN, FROM
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer

STRANGER = "mallory@elsewhere.example"


def host_table(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> dict[str, Any]:
    """The channel's settings as a host user writes them: camelCase, plain JSON values."""
    return {
        "imapHost": "127.0.0.1",
        "imapPort": dovecot.imaps_port,
        "username": account.username,
        "password": account.password,
        "smtpHost": "127.0.0.1",
        "smtpPort": smtp_server.tls_port,
        "smtpSecurity": "tls",
        "smtpUsername": smtp_server.username,
        "smtpPassword": smtp_server.password,
        "fromAddress": FROM,
        "caFile": str(smtp_server.ca_file),
        "stateDir": str(tmp_path / "state"),
        "attachmentsDir": str(tmp_path / "attachments"),
        "allowedSenders": [ANN],
        "senderAuth": "off",
        "initialSync": "unseen",
        "connectTimeoutSecs": 5,
        "commandTimeoutSecs": 5,
    }


def mail(
    mid: str,
    subject: str,
    body: str,
    *,
    refs: list[str] | None = None,
    sender: str = ANN,
    attachment: tuple[str, bytes] | None = None,
) -> bytes:
    """A person's mail, threaded on ``refs``, optionally with one text file attached."""
    msg = EmailMessage()
    msg["From"] = f"Ann Example <{sender}>"
    msg["To"] = FROM
    msg["Subject"] = subject
    msg["Date"] = "Mon, 05 Jan 2026 10:00:00 +0000"
    msg["Message-ID"] = mid
    if refs:
        msg["In-Reply-To"] = refs[-1]
        msg["References"] = " ".join(refs)
    msg.set_content(body)
    if attachment is not None:
        name, data = attachment
        msg.add_attachment(data, maintype="text", subtype="plain", filename=name)
    return bytes(msg)


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (bounded) for a condition the host exposes only by polling."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)
