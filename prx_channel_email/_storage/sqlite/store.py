"""The durable state: UID cursor, ledger of handled messages, and the outbox table.

One SQLite file (WAL) in ``state_dir``. All SQL runs on one dedicated thread so
that nothing blocks the event loop and no two transactions interleave. Each
:meth:`StateStore.run` call is one transaction: either all of it is on disk, or
none of it is.

What a crash at each step means is decided here:
- a message is written as *in flight* (its serialized ChannelMessage, the cursor
  advance past it, and the decisions about any skipped messages before it) in one
  transaction BEFORE it is put on the framework's queue. In-flight messages are
  handed on again after a restart (``redelivered=True``) until they are *settled*:
  moved into the ledger as ``delivered``, by an acknowledgement (``handoff="ack"``)
  or, with ``handoff="queue"``, in the transaction that precedes the next put (or at
  the end of the pass). See ledger.py for the resulting crash table;
- outbox rows are written before the first SMTP attempt (see outbox.py).

Every sqlite3 / OS failure leaves this module as a :class:`StorageError` with a code
(``storage_full``, ``storage_readonly``, ``storage_error``) and the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._storage.sqlite import deferred_table, senders_table
from prx_channel_email._storage.sqlite.outbox_table import OUTBOX_SCHEMA_V1, add_idempotency_key
from prx_channel_email._support.observability import log_event
from prx_channel_email.errors import StorageError

log = logging.getLogger("prx_channel_email.store")

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

    # Comment lines go first, so a ";" in a comment cannot split a statement.
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))

    def step(conn: sqlite3.Connection) -> None:
        for statement in code.split(";"):
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
    (
        "inbound_inflight",
        ddl(
            """
            -- Handed on (or about to be) and not settled yet: handed on again after a
            -- restart. ``message`` is the ChannelMessage as JSON, the other columns are
            -- the ledger row it becomes once settled (reply threading reads them too).
            CREATE TABLE IF NOT EXISTS inflight (
                account TEXT NOT NULL,
                message_id TEXT NOT NULL,
                folder TEXT,
                uidvalidity INTEGER,
                uid INTEGER,
                sender TEXT,
                reply_target TEXT,
                subject TEXT,
                thread_ts TEXT,
                refs TEXT,
                received_at REAL NOT NULL,
                message TEXT NOT NULL,
                handed_at REAL NOT NULL,
                PRIMARY KEY (account, message_id)
            )
            """
        ),
    ),
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
    """One inbound message decided on: its ledger row and where the cursor goes after it.

    ``cursor`` None: the message is not from the folder listing (deferred mail).
    """

    cursor: Cursor | None
    message_id: str | None
    outcome: str = "delivered"
    reason: str | None = None
    uid: int | None = None
    entry: LedgerEntry | None = None
    # More writes that belong in the same transaction (a deferred message's row).
    also: Callable[[sqlite3.Connection], None] | None = None
    # outcome "in_flight" only: the ChannelMessage as JSON (goes to the inflight table).
    message: str | None = None


IN_FLIGHT = "in_flight"
# Ledger outcomes of mail that was accepted (handed on, or waiting to be).
ACCEPTED_SQL = "'delivered','deferred'"
# One ledger row per Message-ID: an accepted outcome replaces a refused one (a stranger
# who used the id first must not shadow the real mail), never the other way round.
_ACCEPTED_WINS = (
    " ON CONFLICT (account, message_id) DO UPDATE SET outcome=excluded.outcome,"
    " reason=excluded.reason, folder=excluded.folder, uidvalidity=excluded.uidvalidity,"
    " uid=excluded.uid, sender=excluded.sender, reply_target=excluded.reply_target,"
    " subject=excluded.subject, thread_ts=excluded.thread_ts, refs=excluded.refs,"
    f" received_at=excluded.received_at WHERE excluded.outcome IN ({ACCEPTED_SQL})"
    f" AND ledger.outcome NOT IN ({ACCEPTED_SQL})"
)


def _ledger_row(account: str, folder: str, item: Decided) -> tuple[Any, ...]:
    entry = item.entry
    return (
        account,
        item.message_id,
        item.outcome,
        item.reason,
        folder,
        item.cursor.uidvalidity if item.cursor else None,
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
        if item.cursor is None:
            continue
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
        """Open (creating and migrating as needed); StorageError when that is impossible."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prx-email-db")
            try:
                await self._submit(self._connect)
            except BaseException:
                executor, self._executor = self._executor, None
                executor.shutdown(wait=False)
                raise
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
        conn: sqlite3.Connection | None = None
        try:
            make_private_dir(self.path.parent)
            # The WAL and shared-memory files take the database file's mode.
            private_file(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            migrate(conn)
            warning = low_space(self.path.parent)
            if warning is not None:
                log_event(log, logging.WARNING, "storage.low_space", path=str(self.path),
                          detail=warning, code="storage_low")  # fmt: skip
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.chmod(0o600)
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise opening_error(exc, self.path) from exc
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
        """Run ``fn(conn)`` as one transaction on the store's thread.

        A database or disk failure raises :class:`StorageError` (nothing of the
        transaction is on disk); ``sqlite3.IntegrityError`` passes through, it is
        about the data, not the storage.
        """

        def tx() -> T:
            conn = self._conn
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        # SQLite may have rolled back already (a full disk).
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise
            except (sqlite3.Error, OSError) as exc:
                raise storage_error(exc, self.path) from exc
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
        """Which of these Message-IDs the ledger holds (any outcome) or has in flight."""

        def q(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(message_ids), 500):
                chunk = message_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for table in ("ledger", "inflight"):
                    found.update(
                        r[0]
                        for r in conn.execute(
                            f"SELECT message_id FROM {table}"
                            f" WHERE account=? AND message_id IN ({marks})",
                            (account, *chunk),
                        )
                    )
            return found

        return await self.run(q)

    async def handed_on(self, account: str, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (Message-ID, sender) pairs name mail already handed on (or
        in flight, or deferred): the duplicate check. Refused or quarantined mail
        never counts, and another sender's mail with the same id is not a copy."""
        wanted = set(pairs)
        ids = sorted({mid for mid, _ in wanted})

        def q(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            found: set[tuple[str, str]] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT message_id, sender FROM ledger WHERE account=?"
                    f" AND outcome IN ({ACCEPTED_SQL}) AND message_id IN ({marks})"
                    " UNION ALL SELECT message_id, sender FROM inflight WHERE account=?"
                    f" AND message_id IN ({marks})",
                    (account, *chunk, account, *chunk),
                )
                found.update(p for p in ((r[0], r[1] or "") for r in rows) if p in wanted)
            return found

        return await self.run(q) if ids else set()

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
        self,
        account: str,
        folder: str,
        items: list[Decided],
        *,
        move_cursor: bool = True,
        settle: list[str] | None = None,
    ) -> None:
        """Record several decisions and cursor moves in one transaction (one fsync).

        Items without a ``message_id`` only move the cursor (a skipped duplicate);
        items with outcome ``in_flight`` go to the inflight table. ``settle`` moves
        those in-flight ids into the ledger first; each item's ``also(conn)`` runs in
        the same transaction. ``move_cursor=False`` writes rows
        only: during a first start or a re-baseline the cursor must not exist half-way,
        or the next start would continue from it instead of finishing that pass.
        """

        def tx(conn: sqlite3.Connection) -> None:
            if settle:
                _settle(conn, account, settle)
            done = [i for i in items if i.message_id and i.outcome != IN_FLIGHT]
            if done:
                conn.executemany(
                    "INSERT INTO ledger (account, message_id, outcome, reason, folder,"
                    " uidvalidity, uid, sender, reply_target, subject, thread_ts, refs,"
                    " received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)" + _ACCEPTED_WINS,
                    [_ledger_row(account, folder, i) for i in done],
                )
            flying = [i for i in items if i.message_id and i.outcome == IN_FLIGHT]
            if flying:
                now = time.time()
                pairs = zip([_ledger_row(account, folder, i) for i in flying], flying, strict=True)
                conn.executemany(
                    "INSERT OR IGNORE INTO inflight (account, message_id, folder, uidvalidity,"
                    " uid, sender, reply_target, subject, thread_ts, refs, received_at,"
                    " message, handed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(*r[:2], *r[4:], i.message or "{}", now) for r, i in pairs],
                )
            for item in items:
                if item.also is not None:
                    item.also(conn)
            for cursor in _cursor_moves(items) if move_cursor else ():
                _write_cursor(conn, account, folder, cursor)

        await self.run(tx)

    async def settle(self, account: str, message_ids: list[str]) -> list[tuple[str, int, int]]:
        """Move in-flight messages into the ledger as delivered (handled for good).

        Returns (folder, uidvalidity, uid) of each one that was still in flight.
        """
        return await self.run(lambda conn: _settle(conn, account, message_ids))

    async def in_flight(self, account: str) -> list[tuple[str, str]]:
        """(message_id, ChannelMessage JSON) of every unsettled message, oldest first."""

        def q(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT message_id, message FROM inflight WHERE account=?"
                " ORDER BY handed_at, rowid",
                (account,),
            )
            return [(r[0], r[1]) for r in rows]

        return await self.run(q)

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
        """The newest delivered (settled or in flight) message matching ``where``."""
        cols = "message_id, sender, reply_target, subject, thread_ts, refs, received_at"
        order = " ORDER BY received_at DESC, rowid DESC LIMIT 1"
        settled = f"SELECT {cols} FROM ledger WHERE account=? AND outcome='delivered' AND {where}"
        flying = f"SELECT {cols} FROM inflight WHERE account=? AND {where}"

        def q(conn: sqlite3.Connection) -> LedgerEntry | None:
            found = [conn.execute(sql + order, (account, *args)).fetchone()
                     for sql in (flying, settled)]  # fmt: skip
            rows = [r for r in found if r is not None]
            if not rows:
                return None
            row = max(rows, key=lambda r: float(r[6]))  # the in-flight one wins a tie
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


def _settle(conn: sqlite3.Connection, account: str, ids: list[str]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for mid in ids:
        row = conn.execute(
            "SELECT folder, uidvalidity, uid FROM inflight WHERE account=? AND message_id=?",
            (account, mid),
        ).fetchone()
        if row is None:
            continue
        conn.execute(
            "INSERT INTO ledger (account, message_id, outcome, reason, folder,"
            " uidvalidity, uid, sender, reply_target, subject, thread_ts, refs, received_at)"
            " SELECT account, message_id, 'delivered', NULL, folder, uidvalidity, uid, sender,"
            " reply_target, subject, thread_ts, refs, received_at FROM inflight"
            " WHERE account=? AND message_id=?" + _ACCEPTED_WINS,
            (account, mid),
        )
        conn.execute("DELETE FROM inflight WHERE account=? AND message_id=?", (account, mid))
        out.append((row[0] or "", row[1] or 0, row[2] or 0))
    return out


_READONLY = {8, 14, 23}  # SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH


def _storage_code(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "storage_full"
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "storage_readonly"
        return "storage_error"
    primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc).lower()
    if primary == 13 or "disk is full" in text:  # SQLITE_FULL
        return "storage_full"
    if primary in _READONLY or "readonly" in text or "unable to open" in text:
        return "storage_readonly"
    return "storage_error"


def storage_error(exc: BaseException, path: Path) -> StorageError:
    """The StorageError for a sqlite3 or OS failure on ``path``."""
    code = _storage_code(exc)
    what = {
        "storage_full": "no space left for the state",
        "storage_readonly": "the state is not writable",
        "storage_error": "the state could not be written",
    }[code]
    return StorageError(f"{what} at {path}: {exc}", code=code, path=str(path))


def opening_error(exc: BaseException, path: Path) -> StorageError:
    """Why the state at ``path`` cannot be opened, and what to do about it."""
    code = _storage_code(exc)
    fix = {
        "storage_full": "free some space on that filesystem",
        "storage_readonly": (
            "make the directory writable by this user (or create it), or point"
            " state_dir at a writable directory"
        ),
        "storage_error": "check the disk, or point state_dir at another directory",
    }[code]
    return StorageError(
        f"cannot open the state in {path.parent} ({exc}); fix: {fix}", code=code, path=str(path)
    )


# Below this much free space where the state lives, the doctor warns (and the channel
# logs at start): the next backlog or reply may not fit, and writes would pause.
LOW_SPACE_BYTES = 64 * 1024 * 1024


def low_space(path: Path, threshold: int = LOW_SPACE_BYTES) -> str | None:
    """A warning when the filesystem holding ``path`` has less than ``threshold`` free."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stats = os.statvfs(probe)
    except OSError:
        return None  # unreadable: the writability check says why
    free = stats.f_bavail * stats.f_frsize
    if free >= threshold:
        return None
    return f"only {free // 1024} KiB free under {path} (warning below {threshold // 1024} KiB)"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it owner-only (0700), whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        # A directory we may write but do not own: its owner decides.
        with contextlib.suppress(PermissionError):
            path.chmod(0o700)


def private_file(path: Path) -> None:
    """Create ``path`` if missing, owner read/write only (0600), whatever the umask."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


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
