"""The SQL of the OAuth token record: one row per account in the state file.

``version`` is a fresh random value at every write, so a reader can tell "replaced"
from "unchanged" without reading the secret (a delete and a new login never look
like the record it had). Functions take a connection inside a transaction.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import asdict

from prx_channel_email._storage.interface import TokenRecord

MIGRATION_NAME = "oauth_tokens"

DDL = """
CREATE TABLE IF NOT EXISTS oauth_tokens (
    account TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Step ``oauth_tokens`` (the token file of older releases is adopted at first use,
    by tokens.py: a schema step cannot know which account a file belongs to)."""
    conn.execute(DDL)


def load(conn: sqlite3.Connection, account: str) -> tuple[str, str] | None:
    """(record JSON, version), or None."""
    row = conn.execute(
        "SELECT record, version FROM oauth_tokens WHERE account=?", (account,)
    ).fetchone()
    return (str(row[0]), str(row[1])) if row else None


def version(conn: sqlite3.Connection, account: str) -> str | None:
    row = conn.execute("SELECT version FROM oauth_tokens WHERE account=?", (account,)).fetchone()
    return str(row[0]) if row else None


def save(conn: sqlite3.Connection, account: str, record: TokenRecord) -> str:
    stamp = secrets.token_hex(8)
    conn.execute(
        "INSERT INTO oauth_tokens (account, record, version, updated_at) VALUES (?,?,?,?)"
        " ON CONFLICT (account) DO UPDATE SET record=excluded.record,"
        " version=excluded.version, updated_at=excluded.updated_at",
        (account, json.dumps(asdict(record), sort_keys=True), stamp, time.time()),
    )
    return stamp


def delete(conn: sqlite3.Connection, account: str) -> bool:
    """Gone for good: ``secure_delete`` overwrites the freed bytes of the secret."""
    conn.execute("PRAGMA secure_delete=ON")
    return conn.execute("DELETE FROM oauth_tokens WHERE account=?", (account,)).rowcount > 0
