"""The SQLite schema: its history of named migration steps, and how a connection opens.

Both the store (store.py) and the token store (tokens.py) open the one state file
through :func:`connect`: private directory and file, WAL, a busy timeout, and the
schema brought up to date.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prx_channel_email._storage.ddl import LEDGER_REFUSED_INDEX, RELEASE_REQUESTS, statements
from prx_channel_email._storage.files import make_private_dir, private_file
from prx_channel_email._storage.sqlite import mail_tables, senders_table, tokens_table
from prx_channel_email._storage.sqlite.outbox_table import OUTBOX_SCHEMA_V1, add_idempotency_key
from prx_channel_email.errors import StorageError

T = TypeVar("T")

DB_NAME = "state.sqlite3"

_CURSOR_V1 = """
-- Per account and folder: the UIDVALIDITY we know and the highest UID handed on.
CREATE TABLE IF NOT EXISTS cursor (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (account, folder)
);
"""

# The schema as the first release wrote it (schema_version 1). Never edit it: a
# change to a table is a new named step appended to MIGRATIONS below.
BASE_SCHEMA = _CURSOR_V1 + mail_tables.LEDGER_SCHEMA_V1 + OUTBOX_SCHEMA_V1

SCHEMA = BASE_SCHEMA  # the name before migrations existed (tests build v1 tables with it)

Step = Callable[[sqlite3.Connection], None]


def ddl(script: str) -> Step:
    """A migration step that runs the ``;``-separated statements of ``script``."""
    code = statements(script)

    def step(conn: sqlite3.Connection) -> None:
        for statement in code:
            conn.execute(statement)

    return step


# Applied in this order, each in its own transaction, each once (recorded by name in
# schema_migrations). Append only; a name is never reused. "base" is idempotent, so a
# state file from before migrations existed (schema_version 1) opens and moves on.
MIGRATIONS: list[tuple[str, Step]] = [
    ("base", ddl(BASE_SCHEMA)),
    ("deferred_mail", mail_tables.migrate_deferred_mail),
    ("outbox_idempotency_key", add_idempotency_key),
    (senders_table.MIGRATION_NAME, senders_table.migrate),
    ("inbound_inflight", ddl(mail_tables.INFLIGHT_V1)),
    ("mail_keys", mail_tables.migrate_mail_keys),
    (tokens_table.MIGRATION_NAME, tokens_table.migrate),
    ("ledger_refused", ddl(LEDGER_REFUSED_INDEX)),
    ("quarantine_releases", ddl(RELEASE_REQUESTS)),
    ("inflight_message_last", ddl(mail_tables.INFLIGHT_MESSAGE_LAST)),
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


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], path: Path) -> T:
    """``fn(conn)`` as one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``).

    A database or disk failure raises :class:`StorageError` (nothing of the
    transaction is on disk); ``sqlite3.IntegrityError`` passes through, it is
    about the data, not the storage.
    """
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
        raise storage_error(exc, path) from exc
    return result


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open the state file at ``path`` (creating and migrating it as needed), owner-only;
    a StorageError with the fix when that is impossible."""
    conn: sqlite3.Connection | None = None
    try:
        make_private_dir(path.parent)
        # The WAL and shared-memory files take the database file's mode.
        private_file(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        migrate(conn)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.chmod(0o600)
    except (OSError, sqlite3.Error) as exc:
        if conn is not None:
            conn.close()
        raise opening_error(exc, path) from exc
    return conn


_READONLY = {8, 14, 23}  # SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH


def _storage_code(exc: BaseException, path: Path | None = None) -> str:
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
    if primary == 10 and path is not None and _read_only_fs(path):  # SQLITE_IOERR
        return "storage_readonly"
    return "storage_error"


def _read_only_fs(path: Path) -> bool:
    """True when ``path`` cannot be opened for writing because its filesystem is read-only.

    SQLite reports a write to a filesystem that turned read-only mid-run (ext4 after an
    I/O error, ``errors=remount-ro``) as a plain I/O error; the kernel still answers an
    open for writing with EROFS. ``statvfs`` is no help: an emergency read-only ext4
    keeps its mount flags.
    """
    try:
        os.close(os.open(path, os.O_WRONLY))  # no O_TRUNC, no O_CREAT: changes nothing
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False
    return False


def storage_error(exc: BaseException, path: Path) -> StorageError:
    """The StorageError for a sqlite3 or OS failure on ``path``."""
    code = _storage_code(exc, path)
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
