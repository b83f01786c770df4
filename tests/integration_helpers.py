"""Shared by the host-integration tests: a channel table for the fixtures, mail with a file."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from prx_channel_email._mail.message_ids import parse_id_list
from tests.outbound_helpers import ANN, FROM, parse
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


async def nth_mail(smtp_server: SmtpServer, n: int, timeout: float = 30.0) -> EmailMessage:
    """The n-th message the SMTP fixture accepted (1-based), once it arrived."""
    received = await smtp_server.await_messages(n, timeout=timeout)
    return parse(received[n - 1].raw)


def assert_threaded(reply: EmailMessage, *, parent: str, references: list[str]) -> None:
    """``reply`` answers ``parent`` and carries the whole chain in References."""
    assert reply["In-Reply-To"] == parent
    assert parse_id_list(reply["References"]) == references


def plain_body(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


@contextlib.contextmanager
def host_process(
    command: list[str], env: dict[str, str], log: Path, stop: signal.Signals
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a host's gateway; on exit stop it with ``stop`` and wait (bounded) for it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def our_pending_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of this package still pending (after a host stopped the channel: none)."""

    def ours(task: asyncio.Task[Any]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and "prx_channel_email" in code.co_filename

    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and ours(t)]


async def lunch_conversation(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, *, timeout: float
) -> None:
    """Ann asks, the bot (an echo model behind a host) answers in the thread, Ann answers
    that, and the bot's second answer extends the same References chain."""
    dovecot.deliver(account, mail("<l1@people.example>", "Lunch", "Are you free today?"),
                    mail_from=ANN)  # fmt: skip
    reply1 = await nth_mail(smtp_server, 1, timeout=timeout)
    assert_threaded(reply1, parent="<l1@people.example>", references=["<l1@people.example>"])
    assert reply1["Subject"] == "Re: Lunch"
    assert plain_body(reply1).startswith("echo:")
    assert "Are you free today?" in plain_body(reply1)

    refs = ["<l1@people.example>", reply1["Message-ID"]]
    dovecot.deliver(account, mail("<l2@people.example>", "Re: Lunch", "Noon works.", refs=refs),
                    mail_from=ANN)  # fmt: skip
    reply2 = await nth_mail(smtp_server, 2, timeout=timeout)
    assert_threaded(reply2, parent="<l2@people.example>", references=[*refs, "<l2@people.example>"])
    assert "Noon works." in plain_body(reply2)


def accounts_host_table(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, users: dict[str, Account]
) -> dict[str, Any]:
    """Several accounts as a host user writes them: the shared settings at the top, an
    ``accounts`` table with each account's login and address (camelCase, as hosts write)."""
    shared = {
        k: v
        for k, v in host_table(tmp_path, smtp_server, dovecot, next(iter(users.values()))).items()
        if k not in ("username", "password", "fromAddress")
    }
    shared["accounts"] = {
        name: {"username": u.username, "password": u.password, "fromAddress": u.address}
        for name, u in users.items()
    }
    return shared
