"""The outbox table: its schema and every SQL statement that reads or writes it.

The outbox (_outbound/outbox.py) decides *when* a row moves; this module only knows
*how* a move is written, in SQLite (``json_each`` for id lists, ``secure_delete``).
Every write method takes ``sent``: rows the server accepted whose "sent" mark has
not reached the disk yet. They are marked in the same
transaction, so a burst pays one fsync per reply, not two (see _outbound/commits.py).

A row moves ``pending -> sending (leased) -> sent``, or to ``failed``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from prx_channel_email._storage.interface import (
    EXHAUSTED_PREFIX,
    NewRow,
    OutboxEntry,
    OutboxRow,
    Stored,
)

T = TypeVar("T")


class Runner(Protocol):
    """The store's one-transaction runner (store.py); a protocol so that this module
    does not import the store, which imports this module's schema."""

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


#: The outbox table as the first release wrote it (part of store.py's "base" step). Never
#: edit it: a change is a step function here, named in store.py's MIGRATIONS list.
OUTBOX_SCHEMA_V1 = """
-- Outbound mail. state: pending -> sending (leased) -> sent | failed.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    mail_from TEXT NOT NULL,
    recipient TEXT NOT NULL,
    raw BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    last_error TEXT,
    smtp_code INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (account, state, next_attempt_at);
"""


def add_idempotency_key(conn: sqlite3.Connection) -> None:
    """Schema step ``outbox_idempotency_key``: the key a send was made with (unique per
    account, when given) and the code of a row's final failure (a repeated send with
    the same key fails the same way)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    if "idempotency_key" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN idempotency_key TEXT")
    if "error_code" not in columns:
        conn.execute("ALTER TABLE outbox ADD COLUMN error_code TEXT")
    conn.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS outbox_idempotency ON outbox"
        " (account, idempotency_key) WHERE idempotency_key IS NOT NULL"
    )


_ENTRY_COLUMNS = (
    "id, message_id, state, recipient, attempts, last_error, smtp_code,"
    " created_at, updated_at, error_code"
)

_COLUMNS = "id, message_id, mail_from, recipient, raw, attempts"


def _row(values: Any) -> OutboxRow:
    return OutboxRow(values[0], values[1], values[2], values[3], bytes(values[4]), values[5])


class OutboxTable:
    """The ``outbox`` rows of one account (an
    :class:`~prx_channel_email._storage.interface.OutboxStore`); every method is one
    transaction."""

    def __init__(self, store: Runner, account: str) -> None:
        self.store = store
        self.account = account

    @staticmethod
    def _mark_sent(conn: sqlite3.Connection, rows: Sequence[OutboxRow]) -> None:
        now = time.time()
        conn.executemany(
            "UPDATE outbox SET state='sent', attempts=attempts+1, lease_until=NULL,"
            " last_error=NULL, smtp_code=250, updated_at=? WHERE id=? AND state!='sent'",
            [(now, r.id) for r in rows],
        )

    async def mark_sent(self, rows: Sequence[OutboxRow]) -> None:
        await self.store.run(lambda conn: self._mark_sent(conn, rows))

    async def recover(self) -> tuple[int, int]:
        """At start: expired leases back to pending, waiting rows due now.

        Returns (rows whose lease had expired, rows waiting to be sent).
        """
        now = time.time()
        account = self.account

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            expired = conn.execute(
                "UPDATE outbox SET state='pending', lease_until=NULL, updated_at=?"
                " WHERE account=? AND state='sending' AND lease_until<=?",
                (now, account, now),
            ).rowcount
            # A start is a fresh chance: what waited for a retry goes out now.
            conn.execute(
                "UPDATE outbox SET next_attempt_at=? WHERE account=? AND state='pending'"
                " AND next_attempt_at>?",
                (now, account, now),
            )
            return expired, self._pending(conn)

        return await self.store.run(tx)

    async def insert(
        self, rows: Sequence[NewRow], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[list[Stored], float]:
        """Store new rows already leased to this process; returns them and their lease end.

        A row whose idempotency key the outbox already holds is not written: its
        :class:`Stored` names the row that holds the key (checked in this same
        transaction, so two sends with one key can never both be written).
        """
        account = self.account

        def tx(conn: sqlite3.Connection) -> tuple[list[Stored], float]:
            self._mark_sent(conn, sent)
            now = time.time()
            until = now + lease_secs
            stored: list[Stored] = []
            for r in rows:
                held = self._by_key(conn, r.idempotency_key) if r.idempotency_key else None
                if held is not None:
                    stored.append(Stored(held.id, held.message_id, held))
                    continue
                cur = conn.execute(
                    "INSERT INTO outbox (account, message_id, mail_from, recipient, raw, state,"
                    " attempts, next_attempt_at, lease_until, created_at, updated_at,"
                    " idempotency_key) VALUES (?,?,?,?,?,'sending',0,?,?,?,?,?)",
                    (
                        account,
                        r.message_id,
                        r.mail_from,
                        r.recipient,
                        r.raw,
                        now,
                        until,
                        now,
                        now,
                        r.idempotency_key,
                    ),
                )
                assert cur.lastrowid is not None
                stored.append(Stored(cur.lastrowid, r.message_id))
            return stored, until

        return await self.store.run(tx)

    def _by_key(self, conn: sqlite3.Connection, key: str) -> OutboxEntry | None:
        values = conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE account=? AND idempotency_key=?",
            (self.account, key),
        ).fetchone()
        return OutboxEntry(*values) if values else None

    async def by_key(self, key: str) -> OutboxEntry | None:
        """The row sent with idempotency key ``key``, if the outbox holds one."""
        return await self.store.run(lambda conn: self._by_key(conn, key))

    async def sent_reply(self, message_id: str) -> tuple[float, str] | None:
        def q(conn: sqlite3.Connection) -> tuple[float, str] | None:
            row = conn.execute(
                "SELECT created_at, recipient FROM outbox WHERE account=? AND message_id=?"
                " ORDER BY created_at LIMIT 1",
                (self.account, message_id),
            ).fetchone()
            return (float(row[0]), str(row[1])) if row else None

        return await self.store.run(q)

    async def claim_due(
        self, exclude: Iterable[int], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[OutboxRow, float] | None:
        """Lease the next due row (never one of ``exclude``); returns it and its lease end."""
        account = self.account
        excluded = json.dumps(list(exclude))

        def tx(conn: sqlite3.Connection) -> tuple[OutboxRow, float] | None:
            # Record what was sent first: a short lease must not make it look abandoned.
            self._mark_sent(conn, sent)
            now = time.time()
            values = conn.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE account=? AND ("
                " (state='pending' AND next_attempt_at<=?)"
                " OR (state='sending' AND lease_until<=?))"
                " AND id NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY next_attempt_at, id LIMIT 1",
                (account, now, now, excluded),
            ).fetchone()
            if values is None:
                return None
            until = now + lease_secs
            conn.execute(
                "UPDATE outbox SET state='sending', lease_until=?, updated_at=? WHERE id=?",
                (until, now, values[0]),
            )
            return _row(values), until

        return await self.store.run(tx)

    async def renew_lease(self, row_id: int, until: float, *, sent: Sequence[OutboxRow]) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            self._mark_sent(conn, sent)
            conn.execute(
                "UPDATE outbox SET lease_until=?, updated_at=? WHERE id=? AND state='sending'",
                (until, time.time(), row_id),
            )

        await self.store.run(tx)

    async def release(self, ids: Sequence[int]) -> None:
        """Rows held but not attempted go back to ``pending``, due now, attempts unchanged."""
        now = time.time()
        await self.store.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET state='pending', lease_until=NULL, next_attempt_at=?,"
                " updated_at=? WHERE id=? AND state='sending'",
                [(now, now, i) for i in ids],
            )
        )

    async def fail(
        self,
        row_id: int,
        error: str,
        *,
        code: str,
        attempts: int | None = None,
        smtp_code: int | None,
    ) -> None:
        """Failed for good; ``attempts=None`` leaves the count alone (no attempt was made)."""
        now = time.time()

        def tx(conn: sqlite3.Connection) -> None:
            if attempts is None:
                conn.execute(
                    "UPDATE outbox SET state='failed', lease_until=NULL, last_error=?,"
                    " smtp_code=?, error_code=?, updated_at=? WHERE id=?",
                    (error, smtp_code, code, now, row_id),
                )
            else:
                conn.execute(
                    "UPDATE outbox SET state='failed', attempts=?, lease_until=NULL,"
                    " last_error=?, smtp_code=?, error_code=?, updated_at=? WHERE id=?",
                    (attempts, error, smtp_code, code, now, row_id),
                )

        await self.store.run(tx)

    async def retry_later(
        self, row_id: int, attempts: int, delay: float, error: str, smtp_code: int | None
    ) -> None:
        now = time.time()
        await self.store.run(
            lambda conn: conn.execute(
                "UPDATE outbox SET state='pending', attempts=?, lease_until=NULL,"
                " next_attempt_at=?, last_error=?, smtp_code=?, updated_at=? WHERE id=?",
                (attempts, now + delay, error, smtp_code, now, row_id),
            )
        )

    async def next_due_in(self, exclude: Iterable[int], default: float) -> float:
        """Seconds until the next row (not in ``exclude``) is due; ``default`` when none is."""
        account = self.account
        excluded = json.dumps(list(exclude))

        def q(conn: sqlite3.Connection) -> float:
            (due,) = conn.execute(
                "SELECT min(CASE state WHEN 'pending' THEN next_attempt_at ELSE lease_until END)"
                " FROM outbox WHERE account=? AND state IN ('pending','sending')"
                " AND id NOT IN (SELECT value FROM json_each(?))",
                (account, excluded),
            ).fetchone()
            if due is None:
                return default
            return max(0.0, float(due) - time.time())

        return await self.store.run(q)

    def _pending(self, conn: sqlite3.Connection) -> int:
        (n,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE account=? AND state IN ('pending','sending')",
            (self.account,),
        ).fetchone()
        return int(n)

    async def pending(self) -> int:
        """How many rows wait to be sent (queued or in flight)."""
        return await self.store.run(self._pending)

    async def requeue_exhausted(self) -> int:
        """Failed rows whose attempts ran out (only transient failures) back to pending.

        A row counts as "ran out" when its last error was recorded as such
        (:data:`EXHAUSTED_PREFIX`) or, for rows written before that marker
        existed, when its last SMTP code was a 4xx (always transient).
        """
        now = time.time()
        account = self.account
        n = await self.store.run(
            lambda conn: (
                conn.execute(
                    "UPDATE outbox SET state='pending', attempts=0, lease_until=NULL,"
                    " next_attempt_at=?, updated_at=? WHERE account=? AND state='failed'"
                    " AND (substr(last_error, 1, ?)=? OR smtp_code BETWEEN 400 AND 499)",
                    (now, now, account, len(EXHAUSTED_PREFIX), EXHAUSTED_PREFIX),
                ).rowcount
            )
        )
        return int(n)

    async def requeue_ids(self, ids: Sequence[int]) -> int:
        """These failed rows back to pending, whatever the failure (the operator's call)."""
        now = time.time()
        account = self.account
        n = await self.store.run(
            lambda conn: sum(
                conn.execute(
                    "UPDATE outbox SET state='pending', attempts=0, lease_until=NULL,"
                    " next_attempt_at=?, updated_at=? WHERE account=? AND id=? AND state='failed'",
                    (now, now, account, row_id),
                ).rowcount
                for row_id in ids
            )
        )
        return int(n)

    async def prune_sent(self, before: float) -> int:
        """Empty the text of rows sent before ``before`` (Unix time); returns how many.

        ``secure_delete`` makes SQLite overwrite the freed bytes: the text must be
        gone from the file, not merely unreachable.
        """
        account = self.account

        def tx(conn: sqlite3.Connection) -> int:
            conn.execute("PRAGMA secure_delete=ON")
            return int(
                conn.execute(
                    "UPDATE outbox SET raw=x'' WHERE account=? AND state='sent'"
                    " AND updated_at<? AND length(raw)>0",
                    (account, before),
                ).rowcount
            )

        return await self.store.run(tx)

    async def entries(self, states: Sequence[str] = (), limit: int = 100) -> list[OutboxEntry]:
        """The newest rows first (optionally only in ``states``), without their bodies."""
        account = self.account
        wanted = json.dumps(list(states))

        def q(conn: sqlite3.Connection) -> list[OutboxEntry]:
            found = conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE account=?"
                " AND (json_array_length(?)=0 OR state IN (SELECT value FROM json_each(?)))"
                " ORDER BY id DESC LIMIT ?",
                (account, wanted, wanted, limit),
            ).fetchall()
            return [OutboxEntry(*values) for values in found]

        return await self.store.run(q)
