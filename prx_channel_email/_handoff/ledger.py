"""The inbound ledger as the sync engine writes it and the outbox reads it.

:class:`LedgerWriter` records what the sync engine decided about each message of
one folder (handed on, refused, quarantined, a duplicate) and moves the UID cursor
with it, committing each accepted message as in flight before it is put on the
queue. Because the in-flight row is on disk before the put, the outbox's "which
message does this reply answer?" lookups (``StateStore.find_message`` and friends,
which read the ledger and the in-flight rows) see a message as soon as the agent
has it: an agent that answers at once threads onto it.

It sits on :class:`~prx_channel_email._storage.sqlite.store.StateStore`, which is plain SQL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prx_channel_email._storage.sqlite.store import (
    IN_FLIGHT,
    Cursor,
    Decided,
    LedgerEntry,
    StateStore,
)
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.errors import StorageError
from prx_channel_email.models import ChannelMessage, pack_message, unpack_message

T = TypeVar("T")

log = logging.getLogger("prx_channel_email.sync")


class LedgerWriter:
    """Hands decided messages of one folder on, committing before each put, in UID order.

    The API (the sync engine's, and the rate limiter's for deferred mail):

    * :meth:`begin` a pass (its UIDVALIDITY, and whether the cursor may move);
    * per message :meth:`skip` (a duplicate), :meth:`record` (refused, quarantined)
      or ``await`` :meth:`hand_on` (accepted); then ``await`` :meth:`flush`;
    * :meth:`redeliver` once per run, before the first pass; :meth:`ack` settles.

    What a crash at each point repeats (the README's crash table is this list):

    * ``hand_on`` first commits, in ONE transaction, the message as *in flight* (its
      serialized ChannelMessage), the cursor past it, the decisions queued by
      ``skip``/``record`` before it, and (``handoff="queue"``) the settling of the
      message put just before. Only then is it put on the queue.
    * A kill before that commit: nothing of it is on disk; the next start fetches it
      again from the cursor (nothing lost, nothing repeated).
    * A kill after the commit: it is in flight, and the next start hands it on again
      with ``redelivered=True``. With ``handoff="ack"`` that is every message not
      acknowledged; with ``handoff="queue"`` it is at most the one message put last
      (the previous ones were settled by the commit that preceded each next put, the
      last by :meth:`flush` at the end of the pass).

    A failed write (full or read-only disk, I/O error) pauses the hand-off in place:
    the same transaction is retried with backoff, nothing more is put on the queue
    and nothing already put is put again; ``on_storage`` hears the fault (and None
    once a write succeeds again), and it is logged once per fault with the path.
    """

    def __init__(
        self,
        store: StateStore,
        account: str,
        folder: str,
        metrics: Metrics,
        *,
        handoff: str = "ack",
        on_storage: Callable[[StorageError | None], None] | None = None,
        storage_backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.account = account
        self.folder = folder
        self.metrics = metrics
        self.handoff = handoff
        self.on_storage = on_storage
        self.storage_backoff = storage_backoff or Backoff(base=0.5, cap=30.0)
        self.storage_fault: StorageError | None = None
        self.uidvalidity = 0
        # False during a first start or a re-baseline: the cursor must not exist
        # half-way, or the next start would continue from it instead of redoing the pass.
        self.move_cursor = True
        self.delivered: list[int] = []  # UIDs handed on in this pass
        # (Message-ID, sender) handed on or deferred in this pass / put on the queue in
        # this run: a second copy is a duplicate, refused mail never shadows.
        self._handled: set[tuple[str, str]] = set()
        self._pending: list[Decided] = []  # decisions that ride on the next commit
        self._unsettled: list[str] = []  # handoff="queue": put, settled by the next commit
        self._handed: set[tuple[str, str]] = set()
        self._acked: list[tuple[int, int]] = []  # (uidvalidity, uid) acked in this folder
        self.last_handed_on_at: float | None = None  # MailboxStatus.last_message_at
        self._lock = asyncio.Lock()

    def begin(self, uidvalidity: int, *, move_cursor: bool = True) -> None:
        """Start a pass over UIDs of ``uidvalidity``; the previous one must be flushed."""
        self.uidvalidity = uidvalidity
        self.move_cursor = move_cursor
        self.delivered = []
        self._handled = set()

    def seen_in_pass(self, message_id: str, sender: str) -> bool:
        """Handed on (or deferred) in this pass, or put on the queue in this run."""
        key = (message_id, sender)
        return key in self._handled or key in self._handed

    # --- decisions ---

    def skip(self, uid: int, message_id: str) -> None:
        """A duplicate: nothing is handed on, only the cursor moves past it."""
        self._pending.append(Decided(Cursor(self.uidvalidity, uid), None))
        self.metrics.inc("inbound.skipped.duplicate")
        log_event(log, logging.INFO, "inbound.duplicate", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code="duplicate")  # fmt: skip

    def defer(
        self,
        uid: int,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        reason: str,
        store_step: Callable[[sqlite3.Connection], None],
    ) -> None:
        """Kept back by the rate limit or the loop guard (deferred.py): the ledger row
        (outcome ``deferred``), the waiting message (``store_step``) and the cursor
        move are one transaction; nothing is put on the queue now."""
        self._handled.add((message.id, message.sender))
        cursor = Cursor(self.uidvalidity, uid)
        self._pending.append(
            Decided(cursor, message.id, "deferred", reason, uid, entry, also=store_step)
        )

    async def hand_on_released(
        self,
        message: ChannelMessage,
        store_step: Callable[[sqlite3.Connection], None],
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Hand on a message that waited (deferred.py): ``store_step`` (its ledger row
        becomes delivered, its deferred row goes) commits with the in-flight write,
        before the put, like any hand-off."""
        await self.hand_on(None, message, None, queue, also=store_step)

    def record(self, uid: int, message_id: str, kind: str, reason: str) -> None:
        """A message not handed on (``rejected`` / ``quarantined``), with why."""
        self._pending.append(Decided(Cursor(self.uidvalidity, uid), message_id, kind, reason, uid))
        # The pipeline counts its decisions (inbound.skipped.<reason>); we log the UID.
        log_event(log, logging.DEBUG, f"inbound.recorded_{kind}", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code=reason)  # fmt: skip

    async def hand_on(
        self,
        uid: int | None,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        queue: asyncio.Queue[ChannelMessage],
        *,
        also: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Commit ``message`` as in flight, then put it on the framework's queue.

        ``uid`` None: not from this pass's folder listing (deferred mail); the cursor
        does not move. ``also`` runs in the same transaction (e.g. removing the
        message from the deferred table), so both happen or neither.
        """
        mid = message.id
        self._handled.add((mid, message.sender))
        cursor = Cursor(self.uidvalidity, uid) if uid is not None else None
        if entry is None:  # what reply threading reads while it is in flight
            entry = LedgerEntry(mid, message.sender, message.reply_target, message.subject,
                                message.thread_ts, list(message.references),
                                time.time())  # fmt: skip
        item = Decided(
            cursor, mid, IN_FLIGHT, None, uid, entry, also=also, message=pack_message(message)
        )
        await self._commit([item])
        self._handed.add((mid, message.sender))
        await queue.put(message)
        self.last_handed_on_at = time.time()
        if self.handoff == "queue":
            self._unsettled.append(mid)
        self.metrics.inc("inbound.handed_on")
        if uid is not None:
            self.delivered.append(uid)
        log_event(log, logging.INFO, "inbound.handed_on", account=self.account,
                  folder=self.folder, uid=uid, message_id=mid)  # fmt: skip

    async def flush(self) -> None:
        """Write the decisions still pending (and settle the last put, queue mode)."""
        if self._pending or self._unsettled:
            await self._commit([])

    async def _commit(self, items: list[Decided]) -> None:
        # One commit at a time: the release of deferred mail hands on concurrently.
        async with self._lock:
            batch = [*self._pending, *items]
            settle = list(self._unsettled)
            move = self.move_cursor

            def write() -> Awaitable[None]:
                return self.store.record_many(
                    self.account, self.folder, batch, move_cursor=move, settle=settle
                )

            await self.durable(write)
            # Only now: a cancelled or failed commit leaves them for the next one.
            del self._pending[: len(batch) - len(items)]
            del self._unsettled[: len(settle)]

    # --- after a restart, and acknowledgements ---

    async def redeliver(self, queue: asyncio.Queue[ChannelMessage]) -> int:
        """Hand on again what an earlier run left in flight (``redelivered=True``)."""
        count = 0
        for mid, data in await self.store.in_flight(self.account):
            try:
                message = unpack_message(data)
            except ValueError as exc:
                log_event(log, logging.ERROR, "inbound.inflight_unreadable", exc=exc,
                          account=self.account, message_id=mid,
                          code="inflight_unreadable")  # fmt: skip
                await self.durable(functools.partial(self.store.settle, self.account, [mid]))
                continue
            if (mid, message.sender) in self._handed:
                continue  # never twice within one run
            if self._unsettled:
                await self._commit([])
            self._handed.add((mid, message.sender))
            await queue.put(message.model_copy(update={"redelivered": True}))
            if self.handoff == "queue":
                self._unsettled.append(mid)
            count += 1
            self.metrics.inc("inbound.redelivered")
            log_event(log, logging.INFO, "inbound.redelivered", account=self.account,
                      folder=self.folder, message_id=mid)  # fmt: skip
        await self.flush()
        return count

    async def ack(self, message_id: str) -> bool:
        """Settle ``message_id``: handled for good. False when it was not in flight.

        Raises StorageError when that cannot be written (the caller may retry).
        """
        done = await self.store.settle(self.account, [message_id])
        for folder, uidvalidity, uid in done:
            if folder == self.folder and uid:
                self._acked.append((uidvalidity, uid))
        return bool(done)

    def take_acked(self, uidvalidity: int) -> list[int]:
        """UIDs acknowledged since the last call, for the optional \\Seen / move."""
        uids = sorted(uid for uv, uid in self._acked if uv == uidvalidity)
        self._acked = []
        return uids

    # --- storage faults ---

    async def durable(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a state write until the storage takes it, pausing (not failing) meanwhile."""
        while True:
            try:
                result = await op()
            except StorageError as exc:
                self._fault(exc)
                await asyncio.sleep(self.storage_backoff.next())
                continue
            if self.storage_fault is not None:
                self._recovered()
            return result

    def _fault(self, exc: StorageError) -> None:
        first = self.storage_fault is None or self.storage_fault.code != exc.code
        self.storage_fault = exc
        self.metrics.inc(f"storage.faults.{exc.code}")
        if first:
            log_event(log, logging.ERROR, "storage.paused", exc=exc, account=self.account,
                      folder=self.folder, path=exc.path, code=exc.code)  # fmt: skip
            if self.on_storage is not None:
                self.on_storage(exc)

    def _recovered(self) -> None:
        fault, self.storage_fault = self.storage_fault, None
        self.storage_backoff.reset()
        log_event(log, logging.INFO, "storage.resumed", account=self.account,
                  folder=self.folder, path=fault.path if fault else None)  # fmt: skip
        if self.on_storage is not None:
            self.on_storage(None)
