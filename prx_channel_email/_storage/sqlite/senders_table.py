"""The SQL of the host's runtime changes to the allow-list.

``allow_sender`` / ``remove_sender`` change who may write to the bot while it
runs; the changes must survive a restart, so they live in the state store, as
differences from the config's ``allowed_senders``: an entry the host added
(``allowed = 1``), or a config entry the host removed (``allowed = 0``). The
effective list is the config's, minus the removed, plus the added; editing the
config later still works (a stale row is harmless). Functions take a connection
inside a transaction of the state store's thread.
"""

from __future__ import annotations

import sqlite3
import time

MIGRATION_NAME = "runtime_senders"

DDL = """
CREATE TABLE IF NOT EXISTS runtime_senders (
    account TEXT NOT NULL,
    entry TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    changed_at REAL NOT NULL,
    PRIMARY KEY (account, entry)
)
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Schema step ``runtime_senders``."""
    conn.execute(DDL)


def load(conn: sqlite3.Connection, account: str) -> tuple[list[str], list[str]]:
    """(added, removed) for ``account``, oldest change first."""
    rows = conn.execute(
        "SELECT entry, allowed FROM runtime_senders WHERE account=? ORDER BY changed_at, entry",
        (account,),
    ).fetchall()
    return [e for e, a in rows if a], [e for e, a in rows if not a]


def change(
    conn: sqlite3.Connection, account: str, entry: str, *, allow: bool, in_config: bool
) -> None:
    """Record that ``entry`` is now allowed (or not), as a difference from the config."""
    if allow == in_config:  # back to what the config says: no difference to keep
        conn.execute("DELETE FROM runtime_senders WHERE account=? AND entry=?", (account, entry))
        return
    conn.execute(
        "INSERT INTO runtime_senders (account, entry, allowed, changed_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (account, entry) DO UPDATE SET allowed=excluded.allowed,"
        " changed_at=excluded.changed_at",
        (account, entry, int(allow), time.time()),
    )
