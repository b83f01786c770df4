"""What one IMAP session holds in memory: asyncio would give each TLS connection a
256 KiB read buffer, most of an idle mailbox's cost; ours read through 32 KiB.

Measured with tracemalloc (Python allocations, deterministic), on real Dovecot,
for implicit TLS and STARTTLS, and a message far bigger than the buffer still
arrives whole."""

from __future__ import annotations

import tracemalloc
from email.message import EmailMessage
from pathlib import Path

import pytest

from prx_channel_email._net.imap import ImapSession, open_session
from prx_channel_email.config import EmailConfig, config_from_table
from tests.config_builder import config_table
from tests.servers.dovecot import Account, DovecotServer

SESSIONS = 8
# Python allocations per session in IDLE; 280 KiB with asyncio's own read buffer.
PER_SESSION_KIB = 100


def config(dovecot: DovecotServer, account: Account, tmp_path: Path, security: str) -> EmailConfig:
    table = config_table(tmp_path, dovecot=dovecot, account=account, imap_security=security,
                         from_address=account.address)  # fmt: skip
    if security == "starttls":
        table["imap_port"] = dovecot.imap_port
    return config_from_table(table)


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_an_idle_session_holds_a_small_read_buffer(
    dovecot: DovecotServer, account: Account, tmp_path: Path, security: str
) -> None:
    cfg = config(dovecot, account, tmp_path, security)
    await (await open_session(cfg)).logout()  # imports, contexts, caches: before measuring
    sessions: list[ImapSession] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(SESSIONS):
            session = await open_session(cfg)
            sessions.append(session)
            await session.select("INBOX")
            await session.idle_start()
        held = (tracemalloc.get_traced_memory()[0] - before) / SESSIONS / 1024
    finally:
        tracemalloc.stop()
        for session in sessions:
            session.abort()
    assert held < PER_SESSION_KIB, f"{held:.0f} KiB per session"


async def test_a_message_much_bigger_than_the_buffer_arrives_whole(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@example.test"
    msg["Subject"] = "big"
    msg["Message-ID"] = "<big-tls@example.test>"
    msg.set_content("0123456789abcdef" * 200_000)  # 3.2 MB of text, 100 buffers' worth
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    dovecot.deliver(account, raw)
    session = await open_session(config(dovecot, account, tmp_path, "tls"))
    try:
        await session.select("INBOX")
        (uid,) = dovecot.list_uids(account)
        bodies = await session.fetch_bodies([uid], total_bytes=len(raw))
    finally:
        await session.logout()
    assert bodies[uid].replace(b"\r\n", b"\n") == dovecot.fetch_raw(account, "INBOX", uid)
