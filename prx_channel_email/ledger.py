"""The inbound ledger as the sync engine writes it and the outbox reads it.

:class:`LedgerWriter` records what the sync engine decided about each message of
one folder (handed on, refused, quarantined, a duplicate) and moves the UID cursor
with it. :class:`LedgerLookup` answers the outbox's "which message does this reply
answer?" questions; it also sees rows a hand-off has staged but not committed yet,
so an agent that answers at once still threads onto the message it got.

Both sit on :class:`~prx_channel_email.store.StateStore`, which is plain SQL.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from .addresses import fold_address
from .models import ChannelMessage
from .observability import Metrics, log_event
from .store import Cursor, Decided, LedgerEntry, StateStore

log = logging.getLogger("prx_channel_email.sync")


class LedgerLookup:
    """Reply-parent lookups: committed ledger rows plus staged ones (read-your-writes).

    One instance is shared by the hand-off (which stages) and the outbox (which
    looks up). Staging is memory only: a staged message whose row never commits is
    handed on again at the next start anyway.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._staged: dict[tuple[str, str], LedgerEntry] = {}

    def stage(self, account: str, entry: LedgerEntry) -> None:
        self._staged[(account, entry.message_id)] = entry

    def committed(self, account: str, message_ids: list[str]) -> None:
        for mid in message_ids:
            self._staged.pop((account, mid), None)

    def _newest_staged(
        self, account: str, match: Callable[[LedgerEntry], bool]
    ) -> LedgerEntry | None:
        found = [e for (acc, _), e in self._staged.items() if acc == account and match(e)]
        return max(found, key=lambda e: e.received_at) if found else None

    async def find_message(self, account: str, message_id: str) -> LedgerEntry | None:
        staged = self._staged.get((account, message_id))
        if staged is not None:
            return staged
        return await self.store.find_message(account, message_id)

    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None:
        """The newest delivered message from ``sender`` (or whose reply target it is)."""
        addr = fold_address(sender)
        staged = self._newest_staged(account, lambda e: addr in (e.sender, e.reply_target))
        return _newer(staged, await self.store.latest_from(account, addr))

    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None:
        staged = self._newest_staged(account, lambda e: thread_ts in (e.thread_ts, e.message_id))
        return _newer(staged, await self.store.latest_in_thread(account, thread_ts))


def _newer(staged: LedgerEntry | None, stored: LedgerEntry | None) -> LedgerEntry | None:
    if staged is None or stored is None:
        return staged or stored
    return staged if staged.received_at >= stored.received_at else stored


class LedgerWriter:
    """Hands decided messages of one folder on and writes their ledger rows, in UID order.

    Use: :meth:`begin` a pass (its UIDVALIDITY, and whether the cursor may move),
    then per message :meth:`skip`, :meth:`hand_on` or :meth:`record`, then
    :meth:`flush` (which must run to completion even when cancelled).

    Ledger writes are group-committed: one writer runs at a time and takes every
    row queued meanwhile into one transaction. A lone message commits at once;
    during a backlog the next messages are parsed while the last ones commit.
    Every row is queued only after its message is on the queue; ``flush`` waits
    until all of them are on disk.
    """

    def __init__(
        self,
        store: StateStore,
        account: str,
        folder: str,
        metrics: Metrics,
        *,
        lookup: LedgerLookup | None = None,
    ) -> None:
        self.store = store
        self.account = account
        self.folder = folder
        self.metrics = metrics
        self.lookup = lookup
        self.uidvalidity = 0
        # False during a first start or a re-baseline: the cursor must not exist
        # half-way, or the next start would continue from it instead of redoing the pass.
        self.move_cursor = True
        self.delivered: list[int] = []  # UIDs handed on in this pass
        self._handled: set[str] = set()
        self._pending: list[Decided] = []
        self._writer: asyncio.Task[None] | None = None

    def begin(self, uidvalidity: int, *, move_cursor: bool = True) -> None:
        """Start a pass over UIDs of ``uidvalidity``; the previous one must be flushed."""
        self.uidvalidity = uidvalidity
        self.move_cursor = move_cursor
        self.delivered = []
        self._handled = set()

    def seen_in_pass(self, message_id: str) -> bool:
        """Already decided in this pass (two copies of one message in one window)."""
        return message_id in self._handled

    def _write(self, item: Decided) -> None:
        self._pending.append(item)
        if self._writer is None or self._writer.done():
            if self._writer is not None and self._writer.exception() is not None:
                return  # flush() raises it
            self._writer = asyncio.ensure_future(self._commit())

    async def _commit(self) -> None:
        while self._pending:
            items, self._pending = self._pending, []
            await self.store.record_many(
                self.account, self.folder, items, move_cursor=self.move_cursor
            )
            if self.lookup is not None:
                self.lookup.committed(self.account, [i.message_id for i in items if i.message_id])

    async def flush(self) -> None:
        """Wait until every row of this pass is on disk."""
        while self._writer is not None:
            writer = self._writer
            await writer
            if writer is self._writer and not self._pending:
                self._writer = None
            elif writer is self._writer:
                self._writer = asyncio.ensure_future(self._commit())

    def skip(self, uid: int, message_id: str) -> None:
        """A duplicate: nothing is handed on, only the cursor moves past it."""
        self._write(Decided(Cursor(self.uidvalidity, uid), None))
        self.metrics.inc("inbound.skipped.duplicate")
        log_event(log, logging.INFO, "inbound.duplicate", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code="duplicate")  # fmt: skip

    async def hand_on(
        self,
        uid: int,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Put ``message`` on the framework's queue and record it as handed on."""
        mid = message.id
        self._handled.add(mid)
        if entry is not None and self.lookup is not None:
            self.lookup.stage(self.account, entry)
        await queue.put(message)
        # From here the message is the framework's: its ledger row must reach the
        # disk even if we are cancelled now (flush runs to completion), or the
        # next start would hand it on again.
        self._write(Decided(Cursor(self.uidvalidity, uid), mid, "delivered", None, uid, entry))
        self.metrics.inc("inbound.handed_on")
        self.delivered.append(uid)
        log_event(log, logging.INFO, "inbound.handed_on", account=self.account,
                  folder=self.folder, uid=uid, message_id=mid)  # fmt: skip

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
        self._handled.add(message.id)
        cursor = Cursor(self.uidvalidity, uid)
        self._write(Decided(cursor, message.id, "deferred", reason, uid, entry, store_step))

    async def hand_on_released(
        self,
        message: ChannelMessage,
        store_step: Callable[[sqlite3.Connection], None],
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Hand on a message that waited: commit "handed on" (``store_step``), then put.

        Runs to completion once started, so a cancellation cannot leave a message
        recorded as handed on but never put.
        """

        async def commit_then_put() -> None:
            await self.store.run(store_step)
            await queue.put(message)

        task = asyncio.ensure_future(commit_then_put())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise
        self.metrics.inc("inbound.handed_on")
        log_event(log, logging.INFO, "inbound.handed_on", account=self.account,
                  folder=self.folder, message_id=message.id, deferred=True)  # fmt: skip

    def record(self, uid: int, message_id: str, kind: str, reason: str) -> None:
        """A message not handed on (``rejected`` / ``quarantined``), with why."""
        self._handled.add(message_id)
        self._write(Decided(Cursor(self.uidvalidity, uid), message_id, kind, reason, uid))
        # The pipeline counts its decisions (inbound.skipped.<reason>); we log the UID.
        log_event(log, logging.DEBUG, f"inbound.recorded_{kind}", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code=reason)  # fmt: skip
