"""Outbound limits: text size, control characters in headers, retention of sent text."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from prx_channel_email._storage.sqlite.store import DB_NAME
from prx_channel_email.errors import SendError
from prx_channel_email.models import SendMessage
from tests.outbound_helpers import ANN, smtp_config
from tests.servers.smtp import SmtpServer
from tests.test_outbox import rows, running_outbox


async def test_text_over_max_outbound_bytes_is_too_large(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, max_outbound_bytes=1000)
    async with running_outbox(config) as outbox:
        for text in ("x" * 1001, "\u6f22" * 334):  # 1001 bytes; 334 chars = 1002 bytes
            with pytest.raises(SendError) as info:
                await outbox.send(SendMessage(content=text, recipient=ANN))
            assert info.value.code == "too_large" and "max_outbound_bytes" in str(info.value)
        assert rows(config) == []
        await outbox.send(SendMessage(content="x" * 1000, recipient=ANN))  # the limit itself
    assert len(smtp_server.messages) == 1


def test_the_default_cap_is_a_megabyte(tmp_path: Path, smtp_server: SmtpServer) -> None:
    assert smtp_config(tmp_path, smtp_server).max_outbound_bytes == 1_000_000


async def test_control_characters_never_reach_a_header(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, from_name="Help\x1cdesk\x7f")
    async with running_outbox(config) as outbox:
        await outbox.send(
            SendMessage(content="x", recipient=ANN, subject="Q\x0b3\x0c report\x1c\x1f\x7f ok")
        )
    got = smtp_server.messages[0]
    head = got.raw.split(b"\r\n\r\n", 1)[0]
    assert not any(b in head for b in (b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x7f"))
    msg = got.message()
    assert msg["Subject"] == "Q3 report ok"
    assert msg["From"].addresses[0].display_name == "Helpdesk"


async def test_sent_text_is_pruned_after_the_retention_but_the_key_still_holds(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, outbox_retention_days=1)
    old = SendMessage(content="old secret text", recipient=ANN, idempotency_key="old")
    async with running_outbox(config) as outbox:
        old_id = await outbox.send(old)
        await outbox.send(SendMessage(content="recent text", recipient=ANN))
    with sqlite3.connect(config.state_dir / DB_NAME) as conn:
        conn.execute("UPDATE outbox SET updated_at=? WHERE id=1", (time.time() - 2 * 86400,))
    async with running_outbox(config) as outbox:  # a start prunes
        assert [bytes(r["raw"]) == b"" for r in rows(config)] == [True, False]
        assert await outbox.send(old) == old_id  # still idempotent: nothing sent
        assert await outbox.send(old.model_copy(update={"content": "other"})) == old_id
    assert len(smtp_server.messages) == 2
    [first, _second] = rows(config)
    assert first["message_id"] == old_id and first["state"] == "sent"
    # Gone from the file itself, not just unreachable (once the WAL is checkpointed).
    conn = sqlite3.connect(config.state_dir / DB_NAME)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    for path in config.state_dir.iterdir():
        assert b"old secret text" not in path.read_bytes(), path
        assert b"recent text" in path.read_bytes() or path.name != DB_NAME
