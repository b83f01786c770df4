"""The durable state: UID cursor, ledger of handled messages, and the outbox table.

One SQLite file (WAL) in ``state_dir``. All SQL runs on one dedicated thread so
that nothing blocks the event loop and no two transactions interleave. Each
:meth:`StateStore.run` call is one transaction: either all of it is on disk, or
none of it is.

What a crash at each step means is decided here:
- the ledger row and the cursor advance for a message are written in the same
  transaction, after the message is on the framework's queue; dying before that
  transaction means the message is handed on again at the next start (at least
  once), dying after it means it never is again. During a backlog the sync engine
  commits the rows of several messages already on the queue together
  (``record_many``), which only widens "handed on again", never "lost";
- outbox rows are written before the first SMTP attempt (see outbox.py).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from . import deferred_table, senders_table
from .addresses import fold_address
from .outbox_table import OUTBOX_SCHEMA_V1, add_idempotency_key

T = TypeVar("T")

DB_NAME = "state.sqlite3"

# The schema as the first release wrote it (schema_version 1). Never edit it: a
# change to a table is a new named step appended to MIGRATIONS below.
BASE_SCHEMA = (
    """
-- Per account and folder: the UIDVALIDITY we know and the highest UID handed on.
CREATE TABLE IF NOT EXISTS cursor (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (account, folder)
);
-- Every inbound message the channel has decided on, by Message-ID.
-- outcome: 'delivered' (on the queue), 'rejected' (policy), 'quarantined' (unparseable).
CREATE TABLE IF NOT EXISTS ledger (
    account TEXT NOT NULL,
    message_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    folder TEXT,
    uidvalidity INTEGER,
    uid INTEGER,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (account, message_id)
);
CREATE INDEX IF NOT EXISTS ledger_by_sender ON ledger (account, sender, received_at);
CREATE INDEX IF NOT EXISTS ledger_by_thread ON ledger (account, thread_ts, received_at);
"""
    + OUTBOX_SCHEMA_V1
)  # the outbox owns its DDL (outbox_table.py)

SCHEMA = BASE_SCHEMA  # the name before migrations existed (tests build v1 tables with it)

Step = Callable[[sqlite3.Connection], None]


def ddl(script: str) -> Step:
    """A migration step that runs the ``;``-separated statements of ``script``."""

    def step(conn: sqlite3.Connection) -> None:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)

    return step


# Applied in this order, each in its own transaction, each once (recorded by name in
# schema_migrations). Append only; a name is never reused. "base" is idempotent, so a
# state file from before migrations existed (schema_version 1) opens and moves on.
MIGRATIONS: list[tuple[str, Step]] = [
    ("base", ddl(BASE_SCHEMA)),
    ("deferred_mail", deferred_table.migrate),
    ("outbox_idempotency_key", add_idempotency_key),
    (senders_table.MIGRATION_NAME, senders_table.migrate),
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, steps: list[tuple[str, Step]] | None = None) -> list[str]:
    """Bring the schema up to date; returns the names of the steps applied now."""
    steps = MIGRATIONS if steps is None else steps
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    applied: list[str] = []
    for version, (name, step) in enumerate(steps, start=1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Checked inside the transaction: another process may have just applied it.
            done = conn.execute("SELECT 1 FROM schema_migrations WHERE name=?", (name,)).fetchone()
            if not done:
                step(conn)
                conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, time.time()),
                )
                applied.append(name)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key)"
                " DO UPDATE SET value=excluded.value WHERE CAST(value AS INTEGER) < ?",
                (str(version), version),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return applied


@dataclass(frozen=True)
class Cursor:
    uidvalidity: int
    last_uid: int
    # When the cursor was last written (Unix time); 0.0 when not read from the store.
    updated_at: float = 0.0


@dataclass(frozen=True)
class LedgerEntry:
    """What the outbound side needs to thread a reply onto a received message."""

    message_id: str
    sender: str
    reply_target: str
    subject: str
    thread_ts: str
    references: list[str]
    received_at: float


@dataclass(frozen=True)
class Decided:
    """One inbound message decided on: its ledger row and where the cursor goes after it."""

    cursor: Cursor
    message_id: str | None
    outcome: str = "delivered"
    reason: str | None = None
    uid: int | None = None
    entry: LedgerEntry | None = None
    # More writes that belong in the same transaction (a deferred message's row).
    also: Callable[[sqlite3.Connection], None] | None = None


class ParentLookup(Protocol):
    """How the outbox finds the message a reply answers (StateStore, or LedgerLookup)."""

    async def find_message(self, account: str, message_id: str) -> LedgerEntry | None: ...
    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None: ...
    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None: ...


def _ledger_row(account: str, folder: str, item: Decided) -> tuple[Any, ...]:
    entry = item.entry
    return (
        account,
        item.message_id,
        item.outcome,
        item.reason,
        folder,
        item.cursor.uidvalidity,
        item.uid,
        entry.sender if entry else None,
        entry.reply_target if entry else None,
        entry.subject if entry else None,
        entry.thread_ts if entry else None,
        json.dumps(entry.references) if entry else None,
        entry.received_at if entry else time.time(),
    )


def _cursor_moves(items: list[Decided]) -> list[Cursor]:
    """The last cursor per UIDVALIDITY, in order (one write each is enough)."""
    last: dict[int, Cursor] = {}
    for item in items:
        last.pop(item.cursor.uidvalidity, None)
        last[item.cursor.uidvalidity] = item.cursor
    return list(last.values())


class StateStore:
    """Async facade over one SQLite file; every call is one transaction on one thread."""

    def __init__(self, state_dir: Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(state_dir) / DB_NAME
        self._synchronous = synchronous
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> StateStore:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prx-email-db")
            await self._submit(self._connect)
        return self

    async def close(self) -> None:
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._disconnect)
        executor.shutdown(wait=True)

    async def __aenter__(self) -> StateStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        migrate(conn)
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _submit(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("state store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as one transaction on the store's thread."""

        def tx() -> T:
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._submit(tx)

    # --- inbound: cursor and ledger ---

    async def get_cursor(self, account: str, folder: str) -> Cursor | None:
        def q(conn: sqlite3.Connection) -> Cursor | None:
            row = conn.execute(
                "SELECT uidvalidity, last_uid, updated_at FROM cursor WHERE account=? AND folder=?",
                (account, folder),
            ).fetchone()
            return Cursor(row[0], row[1], row[2]) if row else None

        return await self.run(q)

    async def set_cursor(self, account: str, folder: str, cursor: Cursor) -> None:
        await self.run(lambda conn: _write_cursor(conn, account, folder, cursor))

    async def seen_ids(self, account: str, message_ids: list[str]) -> set[str]:
        """Which of these Message-IDs the ledger already holds (any outcome)."""

        def q(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(message_ids), 500):
                chunk = message_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    r[0]
                    for r in conn.execute(
                        "SELECT message_id FROM ledger"
                        f" WHERE account=? AND message_id IN ({marks})",
                        (account, *chunk),
                    )
                )
            return found

        return await self.run(q)

    async def record(
        self,
        account: str,
        folder: str,
        cursor: Cursor,
        *,
        message_id: str,
        outcome: str,
        reason: str | None = None,
        uid: int | None = None,
        entry: LedgerEntry | None = None,
    ) -> None:
        """Record one decided message and advance the cursor past it, atomically."""
        item = Decided(cursor, message_id, outcome, reason, uid, entry)
        await self.record_many(account, folder, [item])

    async def record_many(
        self, account: str, folder: str, items: list[Decided], *, move_cursor: bool = True
    ) -> None:
        """Record several decisions and cursor moves in one transaction (one fsync).

        Items without a ``message_id`` only move the cursor (a skipped duplicate).
        ``move_cursor=False`` writes the ledger rows only: during a first start or a
        re-baseline the cursor must not exist half-way, or the next start would
        continue from it instead of finishing that pass.
        """

        def tx(conn: sqlite3.Connection) -> None:
            rows = [_ledger_row(account, folder, i) for i in items if i.message_id]
            if rows:
                conn.executemany(
                    "INSERT OR IGNORE INTO ledger (account, message_id, outcome, reason, folder,"
                    " uidvalidity, uid, sender, reply_target, subject, thread_ts, refs,"
                    " received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            for item in items:
                if item.also is not None:
                    item.also(conn)
            for cursor in _cursor_moves(items) if move_cursor else ():
                _write_cursor(conn, account, folder, cursor)

        await self.run(tx)

    async def find_message(self, account: str, message_id: str) -> LedgerEntry | None:
        """The delivered message with this Message-ID (a reply's parent)."""
        return await self._one(account, "message_id=?", (message_id,))

    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None:
        """The newest delivered message from ``sender`` (or whose reply target it is)."""
        addr = fold_address(sender)
        return await self._one(account, "(sender=? OR reply_target=?)", (addr, addr))

    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None:
        """The newest delivered message of the conversation ``thread_ts``."""
        return await self._one(account, "(thread_ts=? OR message_id=?)", (thread_ts, thread_ts))

    async def _one(self, account: str, where: str, args: tuple[Any, ...]) -> LedgerEntry | None:
        sql = (
            "SELECT message_id, sender, reply_target, subject, thread_ts, refs, received_at"
            f" FROM ledger WHERE account=? AND outcome='delivered' AND {where}"
            " ORDER BY received_at DESC, rowid DESC LIMIT 1"
        )

        def q(conn: sqlite3.Connection) -> LedgerEntry | None:
            row = conn.execute(sql, (account, *args)).fetchone()
            if row is None:
                return None
            return LedgerEntry(
                message_id=row[0],
                sender=row[1] or "",
                reply_target=row[2] or row[1] or "",
                subject=row[3] or "",
                thread_ts=row[4] or row[0],
                references=json.loads(row[5]) if row[5] else [],
                received_at=row[6],
            )

        return await self.run(q)


def _write_cursor(conn: sqlite3.Connection, account: str, folder: str, cursor: Cursor) -> None:
    conn.execute(
        "INSERT INTO cursor (account, folder, uidvalidity, last_uid, updated_at)"
        " VALUES (?,?,?,?,?) ON CONFLICT (account, folder) DO UPDATE SET"
        " uidvalidity=excluded.uidvalidity,"
        " last_uid=CASE WHEN cursor.uidvalidity=excluded.uidvalidity"
        "  THEN max(cursor.last_uid, excluded.last_uid) ELSE excluded.last_uid END,"
        " updated_at=excluded.updated_at",
        (account, folder, cursor.uidvalidity, cursor.last_uid, time.time()),
    )
