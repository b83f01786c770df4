"""The OAuth token record of one account, kept in the SQLite state file.

Why it is built this way:

* The record is a row of the state file (tokens_table.py): replaced in one
  transaction, so a rotated refresh token is either wholly on disk or not at all,
  and private like the rest of the state (0600 in a 0700 directory).
* The one-refresh-at-a-time lock is an ``flock`` on a small file per account next
  to the state: held across the token endpoint's answer (seconds), which a write
  transaction must never be. Polled with ``LOCK_NB``: it never blocks the loop,
  and a cancelled waiter holds nothing.
* Release 58ba6be and earlier kept the record in ``oauth-token.json``; the first
  read for the account whose login it names adopts it (one transaction) and
  removes the file.

Blocking work runs on a worker thread (``asyncio.to_thread``); the store keeps
one connection for its life, used by one thread at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

from prx_channel_email._storage.interface import TokenRecord
from prx_channel_email._storage.sqlite import tokens_table
from prx_channel_email._storage.sqlite.schema import connect, storage_error, transaction
from prx_channel_email.errors import ChannelError, OAuthUnavailable

T = TypeVar("T")

#: Where releases up to 58ba6be kept the record (one per state_dir).
LEGACY_FILE = "oauth-token.json"


class SqliteTokenStore:
    """:class:`~prx_channel_email._storage.interface.TokenStore` on the state file."""

    def __init__(self, path: Path, account: str, *, username: str | None = None) -> None:
        self.path = path
        self.account = account
        self.username = username
        self.location = f"{path} (account {account})"
        digest = hashlib.sha256(account.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self.lock_path = path.parent / f"oauth-{digest}.lock"
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.path)
            if write:
                return transaction(self._conn, fn, self.path)
            try:
                return fn(self._conn)
            except (sqlite3.Error, OSError) as exc:
                raise storage_error(exc, self.path) from exc

    def _damaged(self, where: str) -> ChannelError:
        return ChannelError(
            f"the token store {where} is damaged; run `prx-email auth login`",
            code="oauth_store_damaged",
        )

    def _adopt_legacy(self) -> None:
        """The record an older release kept in its own file becomes this account's row,
        if it names this account's login (or no login at all)."""
        legacy = self.path.parent / LEGACY_FILE
        try:
            raw = legacy.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            data = json.loads(raw)
        except ValueError:
            raise self._damaged(str(legacy)) from None
        if not isinstance(data, dict):
            raise self._damaged(str(legacy))
        record = TokenRecord.from_json(data)
        if record.username not in (None, self.username):
            return  # another account's grant

        def adopt(conn: sqlite3.Connection) -> None:
            if tokens_table.version(conn, self.account) is None:
                tokens_table.save(conn, self.account, record)

        self._run(adopt, write=True)
        with contextlib.suppress(FileNotFoundError):
            legacy.unlink()

    def _absent(self) -> bool:
        """Nothing stored at all: then a look creates no state (the doctor, auth status)."""
        return not self.path.exists() and not (self.path.parent / LEGACY_FILE).exists()

    def _load(self) -> tuple[str, str] | None:
        if self._absent():
            return None
        found = self._run(lambda conn: tokens_table.load(conn, self.account))
        if found is None and (self.path.parent / LEGACY_FILE).exists():
            self._adopt_legacy()
            found = self._run(lambda conn: tokens_table.load(conn, self.account))
        return found

    async def load(self) -> TokenRecord | None:
        found = await asyncio.to_thread(self._load)
        if found is None:
            return None
        try:
            data = json.loads(found[0])
        except ValueError:
            raise self._damaged(self.location) from None
        if not isinstance(data, dict):
            raise self._damaged(self.location)
        return TokenRecord.from_json(data)

    async def version(self) -> object | None:
        def q() -> str | None:
            if self._absent():
                return None
            stamp = self._run(lambda conn: tokens_table.version(conn, self.account))
            if stamp is None and (self.path.parent / LEGACY_FILE).exists():
                found = self._load()
                stamp = found[1] if found else None
            return stamp

        return await asyncio.to_thread(q)

    async def save(self, record: TokenRecord) -> None:
        await asyncio.to_thread(
            self._run, lambda conn: tokens_table.save(conn, self.account, record), write=True
        )

    async def delete(self) -> bool:
        def tx() -> bool:
            if self._absent():
                return False
            self._load()  # an older release's file of this login goes too (adopted first)
            return self._run(lambda conn: tokens_table.delete(conn, self.account), write=True)

        return await asyncio.to_thread(tx)

    async def private(self) -> bool:
        def check() -> bool:
            return not (self.path.stat().st_mode & 0o077) and not (
                self.path.parent.stat().st_mode & 0o077
            )

        return await asyncio.to_thread(check)

    @contextlib.asynccontextmanager
    async def locked(self, within: float) -> AsyncIterator[None]:
        """An exclusive lock between processes (the channel, the doctor, the CLI), so two
        of them never spend the same refresh token."""

        def open_lock() -> int:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)

        fd = await asyncio.to_thread(open_lock)
        try:
            deadline = time.monotonic() + within
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OAuthUnavailable(
                            "another process holds the token store lock", code="oauth_store_busy"
                        ) from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing releases the lock
