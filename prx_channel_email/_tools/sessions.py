"""The tools' own IMAP session per account: opened on demand, closed when idle.

Separate from the listener's IDLE session (a search must never interrupt the push,
and the push must never wait for a search). One session per account, used by one
operation at a time; it logs out after ``IDLE_CLOSE_SECS`` without use, so a host
that calls a tool once an hour holds no connection in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prx_channel_email._net.imap import ImapSession, SelectInfo, open_session
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import TransportError

T = TypeVar("T")

log = logging.getLogger("prx_channel_email.tools")

IDLE_CLOSE_SECS = 60.0
# The folder list is asked again after this long (get/thread look in every folder).
FOLDERS_TTL_SECS = 60.0


class Mailbox:
    """An open session with what it has selected: ``select`` is skipped when unchanged."""

    def __init__(self, session: ImapSession) -> None:
        self.session = session
        self.selected: str | None = None
        self.info: SelectInfo | None = None
        self._folders: list[str] | None = None
        self._folders_at = 0.0

    async def select(self, folder: str, *, fresh: bool = False) -> SelectInfo:
        """SELECT ``folder`` unless it is selected already; ``fresh``: always (its
        UIDNEXT then tells what arrived since)."""
        if fresh or self.selected != folder or self.info is None:
            self.selected = None
            self.info = await self.session.select(folder)
            self.selected = folder
        return self.info

    async def folders(self) -> list[str]:
        now = time.monotonic()
        if self._folders is None or now - self._folders_at > FOLDERS_TTL_SECS:
            self._folders = await self.session.list_folders()
            self._folders_at = now
        return list(self._folders)


class AccountSessions:
    """The tools' session for one account (see the module docstring)."""

    def __init__(
        self,
        config: EmailConfig,
        name: str,
        *,
        tokens: TokenManager | None = None,
        idle_close_secs: float = IDLE_CLOSE_SECS,
    ) -> None:
        self.config = config
        self.tokens = tokens  # the account's OAuth tokens (None: a password login)
        self.name = name
        self.idle_close_secs = idle_close_secs
        self._box: Mailbox | None = None
        self._lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None
        self._last_used = 0.0
        self.bytes_received = 0  # over every session this object opened (benchmarks)
        self._base = 0  # the open session's count already added to bytes_received

    async def run(self, op: Callable[[Mailbox], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``op`` on the open session (opened now if needed). With ``retry``, a
        session that turns out dead (the server dropped it while idle) is replaced
        once and ``op`` run again: only for operations that are safe to repeat."""
        async with self._lock:
            try:
                for attempt in (1, 2):
                    reused = self._box is not None
                    box = await self._open()
                    try:
                        return await op(box)
                    except TransportError as exc:
                        self._drop()
                        if not (retry and reused and attempt == 1):
                            raise
                        log_event(log, logging.INFO, "tools.session_retry", exc=exc,
                                  account=self.name)  # fmt: skip
                raise AssertionError("unreachable")
            finally:
                self._last_used = time.monotonic()
                self._count()

    async def _open(self) -> Mailbox:
        if self._box is not None and self._box.session.is_open:
            return self._box
        self._drop()
        session = await open_session(self.config, self.tokens)
        self._box = Mailbox(session)
        self._base = 0
        log_event(log, logging.DEBUG, "tools.session_opened", account=self.name)
        if self._closer is None or self._closer.done():
            self._closer = asyncio.create_task(self._close_when_idle())
        return self._box

    def _count(self) -> None:
        if self._box is not None:
            now = self._box.session.bytes_received
            self.bytes_received += now - self._base
            self._base = now

    def _drop(self) -> None:
        self._count()
        box, self._box = self._box, None
        if box is not None:
            box.session.abort()

    async def _close_when_idle(self) -> None:
        while True:
            wait = self._last_used + self.idle_close_secs - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            async with self._lock:
                if time.monotonic() - self._last_used < self.idle_close_secs:
                    continue
                await self._logout()
                return

    async def _logout(self) -> None:
        self._count()
        box, self._box = self._box, None
        if box is not None:
            await box.session.logout()
            log_event(log, logging.DEBUG, "tools.session_closed", account=self.name)

    @property
    def is_open(self) -> bool:
        return self._box is not None

    async def close(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None:
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer
        async with self._lock:
            await self._logout()
