"""The SQL of deferred mail: messages the rate limit or the loop guard kept back.

A deferred message is written in the same transaction as its ledger row
(outcome ``deferred``) and the cursor move past it, so from then on it lives
here, not on the server: it is handed on from this table, in ``seq`` order,
with the ChannelMessage exactly as it was built on arrival (JSON of the
pydantic model). Releasing it is one transaction too: the ledger row becomes
``delivered`` (with ``handed_at``, which the rate limit is rebuilt from) and
the deferred row goes. All functions take a connection inside a transaction
of the state store's thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from prx_channel_email._inbound.ratelimit import LOOP_SUSPECTED, Waiting
from prx_channel_email.models import ChannelMessage

MIGRATION_NAME = "deferred_mail"

DDL = """
CREATE TABLE IF NOT EXISTS deferred (
    account TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    reason TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (account, message_id)
);
CREATE INDEX IF NOT EXISTS deferred_in_order ON deferred (account, seq);
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Schema step ``deferred_mail``: the table, and when each ledger row was handed on."""
    # One statement at a time: executescript() would COMMIT the step's transaction.
    for statement in DDL.split(";"):
        if statement.strip():
            conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    if "handed_at" not in columns:
        conn.execute("ALTER TABLE ledger ADD COLUMN handed_at REAL")


def insert(conn: sqlite3.Connection, account: str, item: Waiting, message: ChannelMessage) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO deferred (account, message_id, seq, sender, reason, arrived_at,"
        " message) VALUES (?,?,?,?,?,?,?)",
        (
            account,
            item.message_id,
            item.seq,
            item.sender,
            item.reason,
            item.arrived_at,
            message.model_dump_json(),
        ),
    )


def load(conn: sqlite3.Connection, account: str) -> list[Waiting]:
    """Everything waiting, in line order (held mail is marked by its reason)."""
    return [
        Waiting(
            seq,
            mid,
            sender,
            arrived_at,
            held=reason == LOOP_SUSPECTED,
            thread=str(json.loads(message).get("thread_ts") or ""),
        )
        for mid, seq, sender, reason, arrived_at, message in conn.execute(
            "SELECT message_id, seq, sender, reason, arrived_at, message FROM deferred"
            " WHERE account=? ORDER BY seq",
            (account,),
        )
    ]


def message(conn: sqlite3.Connection, account: str, message_id: str) -> ChannelMessage | None:
    row = conn.execute(
        "SELECT message FROM deferred WHERE account=? AND message_id=?", (account, message_id)
    ).fetchone()
    return ChannelMessage.model_validate_json(row[0]) if row else None


def mark_handed_on(conn: sqlite3.Connection, account: str, message_id: str, at: float) -> None:
    """The deferred message goes on the queue: its ledger row says so, its row goes."""
    conn.execute(
        "UPDATE ledger SET outcome='delivered', handed_at=? WHERE account=? AND message_id=?",
        (at, account, message_id),
    )
    conn.execute("DELETE FROM deferred WHERE account=? AND message_id=?", (account, message_id))


def recent_handoffs(
    conn: sqlite3.Connection, account: str, since: float
) -> Iterable[tuple[str, float]]:
    """``(sender, when)`` of every message handed on since ``since``: settled ones from
    the ledger, unacknowledged ones from the in-flight table (each message once)."""
    found: dict[str, tuple[str, float]] = {}
    for mid, sender, at in conn.execute(
        "SELECT message_id, sender, COALESCE(handed_at, received_at) FROM ledger"
        " WHERE account=? AND outcome='delivered' AND sender IS NOT NULL"
        " AND COALESCE(handed_at, received_at) > ?"
        " UNION ALL SELECT message_id, sender, handed_at FROM inflight"
        " WHERE account=? AND sender IS NOT NULL AND handed_at > ?",
        (account, since, account, since),
    ):
        found.setdefault(mid, (sender, at))  # a released message: the ledger's time counts
    return sorted(found.values(), key=lambda pair: pair[1])
