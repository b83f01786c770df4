"""The SQLite backend of the storage interface: one file (WAL) in ``state_dir``.

All SQL runs on one dedicated thread so that nothing blocks the event loop and
no two transactions interleave. Each operation is one transaction (``BEGIN
IMMEDIATE`` ... ``COMMIT``): either all of it is on disk, or none of it. The
tables' SQL lives with its owner: mail_tables.py (ledger, in-flight, deferred),
outbox_table.py, senders_table.py; the cursor's is here.

Every sqlite3 / OS failure leaves this module as a :class:`StorageError` with a code
(``storage_full``, ``storage_readonly``, ``storage_error``) and the path.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._storage.files import low_space
from prx_channel_email._storage.interface import (
    CopiesOf,
    Cursor,
    HandoffBatch,
    InFlightRow,
    LedgerEntry,
    Mailbox,
    MailKey,
    QuarantinedMail,
    ReleaseRequest,
    SenderChanges,
    WaitingRow,
)
from prx_channel_email._storage.sqlite import mail_tables, senders_table
from prx_channel_email._storage.sqlite.outbox_table import OutboxTable
from prx_channel_email._storage.sqlite.schema import (
    BASE_SCHEMA,
    DB_NAME,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    Step,
    connect,
    ddl,
    migrate,
    transaction,
)
from prx_channel_email._storage.sqlite.tokens import SqliteTokenStore
from prx_channel_email._support.observability import log_event

log = logging.getLogger("prx_channel_email.store")

T = TypeVar("T")

# Re-exported: the names tests and tools knew the schema by.
__all__ = [
    "BASE_SCHEMA",
    "DB_NAME",
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "StateStore",
    "Step",
    "ddl",
    "migrate",
    "state_exists",
]


def state_exists(state_dir: Path) -> bool:
    """True when ``state_dir`` holds a state file (something was ever stored there)."""
    return (Path(state_dir) / DB_NAME).is_file()


class StateStore:
    """The :class:`~prx_channel_email._storage.interface.Storage` on one SQLite file;
    every call is one transaction on one thread."""

    def __init__(self, state_dir: Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(state_dir) / DB_NAME
        self.location = str(self.path)
        self._synchronous = synchronous
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._outboxes: dict[str, OutboxTable] = {}

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
        self._conn = connect(self.path, self._synchronous)
        warning = low_space(self.path.parent)
        if warning is not None:
            log_event(log, logging.WARNING, "storage.low_space", path=str(self.path),
                      detail=warning, code="storage_low")  # fmt: skip

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _submit(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("state store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` as one transaction on the store's thread (this backend's own
        tables and tests only: callers use the interface's operations). Failures as
        :func:`~prx_channel_email._storage.sqlite.schema.transaction`."""

        def tx() -> T:
            assert self._conn is not None
            return transaction(self._conn, fn, self.path)

        return await self._submit(tx)

    async def migrations(self) -> list[str]:
        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")
            return [r[0] for r in rows]

        return await self.run(q)

    # --- cursor ---

    async def get_cursor(self, mailbox: Mailbox) -> Cursor | None:
        def q(conn: sqlite3.Connection) -> Cursor | None:
            row = conn.execute(
                "SELECT uidvalidity, last_uid, updated_at FROM cursor WHERE account=? AND folder=?",
                (mailbox.account, mailbox.folder),
            ).fetchone()
            return Cursor(row[0], row[1], row[2]) if row else None

        return await self.run(q)

    async def set_cursor(
        self, mailbox: Mailbox, cursor: Cursor, *, fence: int | None = None
    ) -> None:
        # One process owns the file: there is no lease to check (``fence`` is ignored).
        await self.run(lambda conn: _write_cursor(conn, mailbox, cursor))

    # --- the hand-off ---

    async def commit_handoff(self, batch: HandoffBatch) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            mail_tables.commit_handoff(conn, batch)
            for cursor in batch.cursors:
                _write_cursor(conn, batch.mailbox, cursor)

        await self.run(tx)

    async def settle(self, refs: Sequence[MailKey | CopiesOf]) -> list[MailKey]:
        if not refs:
            return []
        return await self.run(lambda conn: mail_tables.settle(conn, refs))

    async def in_flight(self, mailbox: Mailbox) -> list[InFlightRow]:
        return await self.run(lambda conn: mail_tables.in_flight(conn, mailbox))

    async def handed_on(
        self, account: str, pairs: Iterable[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        wanted = set(pairs)
        if not wanted:
            return set()
        return await self.run(lambda conn: mail_tables.handed_on(conn, account, wanted))

    async def find_message(
        self, account: str, message_id: str, *, recipient: str | None = None
    ) -> LedgerEntry | None:
        def q(conn: sqlite3.Connection) -> LedgerEntry | None:
            if recipient:
                addr = fold_address(recipient)
                found = mail_tables.newest(
                    conn,
                    account,
                    "message_id=? AND (sender=? OR reply_target=?)",
                    (message_id, addr, addr),
                )
                if found is not None:
                    return found
            return mail_tables.newest(conn, account, "message_id=?", (message_id,))

        return await self.run(q)

    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None:
        addr = fold_address(sender)
        return await self.run(
            lambda conn: mail_tables.newest(
                conn, account, "(sender=? OR reply_target=?)", (addr, addr)
            )
        )

    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None:
        return await self.run(
            lambda conn: mail_tables.newest(
                conn, account, "(thread_ts=? OR message_id=?)", (thread_ts, thread_ts)
            )
        )

    # --- deferred mail and rate history ---

    async def waiting(self, mailbox: Mailbox) -> list[WaitingRow]:
        return await self.run(lambda conn: mail_tables.waiting(conn, mailbox))

    async def deferred_message(self, key: MailKey) -> str | None:
        return await self.run(lambda conn: mail_tables.deferred_message(conn, key))

    async def quarantined(self, account: str, limit: int = 100) -> list[QuarantinedMail]:
        return await self.run(lambda conn: mail_tables.quarantined(conn, account, limit))

    async def refuse_waiting(self, key: MailKey, reason: str, *, fence: int | None = None) -> bool:
        # One process owns the file: there is no lease to check (``fence`` is ignored).
        return await self.run(lambda conn: mail_tables.refuse_waiting(conn, key, reason))

    # --- releases of quarantined mail ---

    async def request_release(
        self, key: MailKey, *, refuse: Sequence[str] = ()
    ) -> ReleaseRequest | None:
        return await self.run(lambda conn: mail_tables.request_release(conn, key, refuse))

    async def release_request(self, key: MailKey) -> ReleaseRequest | None:
        return await self.run(lambda conn: mail_tables.release_request(conn, key))

    async def pending_releases(self, account: str | None = None) -> list[ReleaseRequest]:
        return await self.run(lambda conn: mail_tables.pending_releases(conn, account))

    async def fail_release(self, key: MailKey, code: str, detail: str) -> None:
        await self.run(lambda conn: mail_tables.fail_release(conn, key, code, detail))

    async def prune_refused(self, account: str, before: float) -> int:
        return await self.run(lambda conn: mail_tables.prune_refused(conn, account, before))

    async def recent_handoffs(self, account: str, since: float) -> list[tuple[str, float]]:
        return await self.run(lambda conn: mail_tables.recent_handoffs(conn, account, since))

    # --- runtime allow-list ---

    async def runtime_senders(self, account: str) -> SenderChanges:
        added, removed = await self.run(lambda conn: senders_table.load(conn, account))
        return SenderChanges(added, removed)

    async def change_sender(
        self, account: str, entry: str, *, allow: bool, in_config: bool
    ) -> None:
        await self.run(
            lambda conn: senders_table.change(
                conn, account, entry, allow=allow, in_config=in_config
            )
        )

    # --- OAuth tokens ---

    def tokens(self, account: str, *, username: str | None = None) -> SqliteTokenStore:
        """The token record of ``account``: a row of this same file, read and written by
        short transactions of their own (the store need not be open: the CLI and the
        doctor use it alone)."""
        return SqliteTokenStore(self.path, account, username=username)

    # --- outbox ---

    def outbox(self, account: str) -> OutboxTable:
        table = self._outboxes.get(account)
        if table is None:
            table = self._outboxes[account] = OutboxTable(self, account)
        return table


def _write_cursor(conn: sqlite3.Connection, mailbox: Mailbox, cursor: Cursor) -> None:
    conn.execute(
        "INSERT INTO cursor (account, folder, uidvalidity, last_uid, updated_at)"
        " VALUES (?,?,?,?,?) ON CONFLICT (account, folder) DO UPDATE SET"
        " uidvalidity=excluded.uidvalidity,"
        " last_uid=CASE WHEN cursor.uidvalidity=excluded.uidvalidity"
        "  THEN max(cursor.last_uid, excluded.last_uid) ELSE excluded.last_uid END,"
        " updated_at=excluded.updated_at",
        (mailbox.account, mailbox.folder, cursor.uidvalidity, cursor.last_uid, time.time()),
    )
