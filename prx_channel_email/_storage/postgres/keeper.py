"""Keeps one replica's share of the mailbox leases, and says when to serve or stop.

One task per replica, whatever the number of mailboxes: every ``lease_secs / 3`` it
beats the replica's heartbeat, renews what it holds, gives back a surplus over its
share and takes free or expired leases up to it. The channel is told through two
callbacks: ``on_gain(lease)`` (start serving that mailbox) and ``on_loss(lease)``
(stop at once: leave IDLE, hand nothing more on).

A lease is also checked against the local monotonic clock (:meth:`LeaseKeeper.valid`),
which keeps running while a process is stopped: a replica frozen past its lease knows
on waking, before any database round trip, that it must not hand anything on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from prx_channel_email._storage.postgres.leases import Lease, LeaseTable, share
from prx_channel_email._support.observability import log_event

log = logging.getLogger("prx_channel_email.replicas")

Callback = Callable[[Lease], Awaitable[None]]


def _preference(replica_id: str, mailbox: tuple[str, str]) -> str:
    """Rendezvous order: each replica prefers different mailboxes, so a start of many
    replicas at once spreads without every one racing for the same rows."""
    return hashlib.sha256(f"{replica_id}\0{mailbox[0]}\0{mailbox[1]}".encode()).hexdigest()


class LeaseKeeper:
    """This replica's leases; :meth:`run` until cancelled, then :meth:`leave`."""

    def __init__(
        self,
        table: LeaseTable,
        replica_id: str,
        mailboxes: Sequence[tuple[str, str]],
        *,
        on_gain: Callback,
        on_loss: Callback,
    ) -> None:
        self.table = table
        self.replica_id = replica_id
        self.mailboxes = list(dict.fromkeys(mailboxes))
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.lease_secs = table.lease_secs
        self.held: dict[tuple[str, str], Lease] = {}
        # Monotonic time until which each held lease is surely still ours.
        self._valid_until: dict[tuple[str, str], float] = {}
        self.live_replicas = 1
        # Who serves which mailbox, as of the last tick (status pages).
        self.holders: dict[tuple[str, str], str] = {}
        self.ticked = asyncio.Event()  # set after every completed tick (tests, status)

    def lease(self, mailbox: tuple[str, str]) -> Lease | None:
        """The lease to write under, or None when this replica must not serve it."""
        return self.held.get(mailbox) if self.valid(mailbox) else None

    def valid(self, mailbox: tuple[str, str]) -> bool:
        """Held, and not run out by the local clock (a safety margin of a third)."""
        return time.monotonic() < self._valid_until.get(mailbox, 0.0)

    @property
    def interval(self) -> float:
        return self.lease_secs / 3

    async def run(self) -> None:
        """Tick every ``lease_secs / 3`` until cancelled.

        A tick the database does not answer (a network split, a frozen server) is not
        waited for: after half a lease it is abandoned, and leases that ran out by the
        local clock are dropped all the same, so this replica stops serving them on
        time even when the database cannot tell it so.
        """
        tick: asyncio.Task[None] | None = None
        try:
            while True:
                started = time.monotonic()
                if tick is None or tick.done():
                    tick = asyncio.create_task(self.tick(started))
                done, _ = await asyncio.wait({tick}, timeout=self.lease_secs / 2)
                if tick in done:
                    exc = tick.exception()
                    if exc is None:
                        self.ticked.set()
                    else:
                        log_event(log, logging.WARNING, "replica.tick_failed",
                                  replica=self.replica_id, error=type(exc).__name__,
                                  code="lease_renewal_failed")  # fmt: skip
                else:
                    tick.cancel()  # not awaited: a cut connection may take long to give up
                    log_event(log, logging.WARNING, "replica.tick_failed",
                              replica=self.replica_id, error="no answer",
                              code="lease_renewal_failed")  # fmt: skip
                await self._drop_expired()
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            if tick is not None:
                tick.cancel()

    async def tick(self, started: float | None = None) -> None:
        """One round: heartbeat, renew, then give back or take to reach the share."""
        started = time.monotonic() if started is None else started
        self.live_replicas = await self.table.heartbeat(self.replica_id)
        kept = await self.table.renew(list(self.held.values()))
        # Valid for the lease minus the tick's own duration and a third as margin.
        until = started + self.lease_secs * 2 / 3
        for lease in kept:
            self._valid_until[lease.mailbox] = until
        for mailbox in set(self.held) - {lease.mailbox for lease in kept}:
            await self._lose(self.held[mailbox], "renewal_refused")
        target = share(len(self.mailboxes), self.live_replicas)
        if len(self.held) > target:
            surplus = sorted(self.held, key=lambda m: _preference(self.replica_id, m))
            for mailbox in surplus[: len(self.held) - target][::-1]:
                lease = self.held[mailbox]
                await self._lose(lease, "rebalanced")  # stop serving first,
                await self.table.release([lease])  # then let another take it
        elif len(self.held) < target:
            free = [m for m in self.mailboxes if m not in self.held]
            free.sort(key=lambda m: _preference(self.replica_id, m))
            for lease in await self.table.acquire(
                self.replica_id, free, limit=target - len(self.held)
            ):
                self.held[lease.mailbox] = lease
                self._valid_until[lease.mailbox] = started + self.lease_secs * 2 / 3
                log_event(log, logging.INFO, "replica.lease_gained",
                          replica=self.replica_id, account=lease.account,
                          folder=lease.folder, epoch=lease.epoch)  # fmt: skip
                await self.on_gain(lease)
        self.holders = {m: h.owner for m, h in (await self.table.holders()).items()
                        if h.expires_in > 0}  # fmt: skip

    async def lost(self, lease: Lease) -> None:
        """A write under ``lease`` was refused: stop serving that mailbox now."""
        if self.held.get(lease.mailbox) == lease:
            await self._lose(lease, "write_refused")

    async def leave(self) -> None:
        """A clean stop: stop serving everything and give the leases back at once."""
        leases = list(self.held.values())
        for lease in leases:
            await self._lose(lease, "stopping")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.table.leave(self.replica_id, leases), self.interval)

    async def _drop_expired(self) -> None:
        for mailbox in [m for m in self.held if not self.valid(m)]:
            await self._lose(self.held[mailbox], "renewal_failed")

    async def _lose(self, lease: Lease, why: str) -> None:
        self.held.pop(lease.mailbox, None)
        self._valid_until.pop(lease.mailbox, None)
        log_event(log, logging.WARNING if why != "rebalanced" else logging.INFO,
                  "replica.lease_lost", replica=self.replica_id, account=lease.account,
                  folder=lease.folder, epoch=lease.epoch, reason=why)  # fmt: skip
        await self.on_loss(lease)
