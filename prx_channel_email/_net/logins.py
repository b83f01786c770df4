"""At most so many IMAP logins in progress per server, over every mailbox of the process.

A process that serves hundreds of mailboxes on one server would otherwise open
hundreds of connections at once when it starts, and again when the server comes
back after an outage (every mailbox's backoff runs out at about the same time).
Providers throttle or lock accounts that do that. The gate lets
``max_concurrent_logins`` connect-and-login exchanges run at a time per server
(host and port); the rest wait their turn, in order. A session that is logged in
holds no place: only the login is gated, IDLE is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prx_channel_email._net.imap import ImapSession, open_session
from prx_channel_email.config import EmailConfig

Opener = Callable[[EmailConfig], Awaitable[ImapSession]]


class LoginGate:
    """One semaphore per IMAP server, made on first use (nothing per mailbox)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._gates: dict[tuple[str, int], asyncio.Semaphore] = {}
        self.waiting = 0  # logins waiting for a place right now (diagnostics, tests)

    def opener(self, open_: Opener = open_session) -> Opener:
        """``open_`` (connect and log in), taking a place at the account's server first."""

        async def gated(config: EmailConfig) -> ImapSession:
            key = (config.imap_host.strip().rstrip(".").lower(), config.imap_port)
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = asyncio.Semaphore(self.limit)
            self.waiting += 1
            try:
                await gate.acquire()
            finally:
                self.waiting -= 1
            try:
                return await open_(config)
            finally:
                gate.release()

        return gated
