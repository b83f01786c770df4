"""The hand-off ledger both flows share: what was handed on, and what is settled.

:class:`HandoffLedger` (one per account) is the one place where received mail
is *settled* (handled for good): by the host's acknowledgement, and by a reply to
it once that reply is durably in the outbox. The outbox finds a reply's parent
through it, in the storage interface, which sees a message as soon as the agent
has it (its in-flight row is on disk before the put): an agent that answers at
once threads onto it.

:class:`LedgerWriter` (one per mailbox) records what the sync engine decided
about each message of one folder (handed on, refused, quarantined, deferred, a
duplicate) and moves the UID cursor with it, committing each accepted message as
in flight before it is put on the queue. Everything it writes goes through
:meth:`Storage.commit_handoff <prx_channel_email._storage.interface.Storage.commit_handoff>`
as data; its memory changes only after that returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from prx_channel_email._storage import (
    DELIVERED,
    QUARANTINED,
    CopiesOf,
    Cursor,
    Deferral,
    HandoffBatch,
    InFlight,
    LeaseLost,
    LedgerEntry,
    Mailbox,
    MailKey,
    Record,
    Release,
    Storage,
)
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.errors import StorageError
from prx_channel_email.models import ChannelMessage, pack_message, unpack_message

T = TypeVar("T")

log = logging.getLogger("prx_channel_email.sync")


class HandoffLedger:
    """The hand-off ledger of one account, shared by the inbound and outbound flows.

    ``handoff`` is the account's mode: with ``"ack"`` a message stays in flight until
    :meth:`ack` (the host) or :meth:`reply_durable` (a reply to it) settles it; with
    ``"queue"`` the sync engine settles it itself and both do nothing.
    """

    def __init__(self, store: Storage, account: str, *, handoff: str = "ack") -> None:
        self.store = store
        self.account = account
        self.handoff = handoff
        # (uidvalidity, uid) settled per mailbox, for the optional \Seen / move.
        self._acked: dict[Mailbox, list[tuple[int, int]]] = {}
        # The writers' hooks: told which mail is settled, so what they keep about mail
        # in flight goes with it (a long run would otherwise keep every message).
        self._on_settled: list[Callable[[list[MailKey]], None]] = []

    def on_settled(self, hook: Callable[[list[MailKey]], None]) -> None:
        """Call ``hook`` with the keys of mail settled here, after each commit."""
        self._on_settled.append(hook)

    async def ack(self, message: ChannelMessage) -> bool:
        """The host is done with ``message``: it and its true copies (same Message-ID,
        same sender) are settled. Another sender's mail with the same Message-ID is
        not touched. False when nothing was in flight.

        Raises StorageError when that cannot be written (the caller may retry).
        """
        if self.handoff != "ack":
            return False
        return await self._settle([CopiesOf(self.account, message.id, message.sender)])

    async def find_parent(
        self,
        *,
        reply_id: str | None,
        thread: str | None,
        recipient: str,
        explicit: bool,
    ) -> LedgerEntry | None:
        """The received mail a reply answers: ``reply_id`` (preferring the mail from, or
        replying to, ``recipient``), else the newest of ``thread``, else (nothing
        ``explicit`` given) the newest from ``recipient``."""
        if reply_id is not None:
            return await self.store.find_message(self.account, reply_id, recipient=recipient)
        if thread is not None:
            return await self.store.latest_in_thread(self.account, thread)
        if not explicit:
            return await self.store.latest_from(self.account, recipient)
        return None

    async def reply_durable(self, parent: MailKey | None) -> None:
        """A reply to ``parent`` is durably in the outbox: the parent is handled."""
        if self.handoff == "ack" and parent is not None:
            await self._settle([parent])

    async def _settle(self, refs: list[MailKey | CopiesOf]) -> bool:
        done = await self.store.settle(refs)
        for key in done:  # only after the commit returned
            self._acked.setdefault(key.mailbox, []).append((key.uidvalidity, key.uid))
        for hook in self._on_settled:
            hook(done)
        return bool(done)

    async def prune_refused(self, retention_days: float) -> int:
        """Delete the records of refused mail older than ``retention_days``; how many.

        A stranger's mail costs a row each, for ever, unless pruned; nothing reads the
        row back (the cursor keeps that mail from being fetched again, and the storage
        keeps a row the cursor has not passed). Quarantined mail is never pruned here:
        an operator may still release it.
        """
        cutoff = time.time() - retention_days * 86400
        pruned = await self.store.prune_refused(self.account, cutoff)
        if pruned:
            log_event(log, logging.INFO, "ledger.pruned_refused", account=self.account,
                      pruned=pruned)  # fmt: skip
        return pruned

    def take_acked(self, mailbox: Mailbox, uidvalidity: int) -> list[int]:
        """UIDs of ``mailbox`` settled since the last call, for the optional \\Seen / move."""
        acked = self._acked.pop(mailbox, [])
        return sorted(uid for uv, uid in acked if uv == uidvalidity)


@dataclass(frozen=True)
class _Pending:
    """A decision that rides on the next commit."""

    cursor: Cursor | None
    record: Record | None = None
    deferral: Deferral | None = None
    on_durable: Callable[[], None] | None = None  # memory to change once committed


@dataclass(frozen=True)
class _Staged:
    """An accepted message of the current fetch step, waiting for the step's commit."""

    uid: int
    item: InFlight
    message: ChannelMessage
    queue: asyncio.Queue[ChannelMessage]


def cursor_moves(cursors: list[Cursor]) -> list[Cursor]:
    """The last cursor per UIDVALIDITY, in order (one write each is enough)."""
    last: dict[int, Cursor] = {}
    for cursor in cursors:
        last.pop(cursor.uidvalidity, None)
        last[cursor.uidvalidity] = cursor
    return list(last.values())


class LedgerWriter:
    """Hands decided messages of one folder on, committing before each put, in UID order.

    The API (the sync engine's, and the rate limiter's for deferred mail):

    * :meth:`begin` a pass (its UIDVALIDITY, and whether the cursor may move);
    * per message :meth:`skip` (a duplicate), :meth:`record` (refused, quarantined),
      :meth:`defer` (kept back) or ``await`` :meth:`accept` (accepted), and ``await``
      :meth:`put_staged` at the end of each fetch step; then ``await`` :meth:`flush`
      (:meth:`hand_on` commits and puts one message at once: deferred mail);
    * :meth:`redeliver` once per run, before the first pass. Settling (acks, replies)
      is the shared :class:`HandoffLedger`'s.

    What a crash at each point repeats (the README's crash table is this list;
    tests/test_crash_points.py kills just before and just after each commit):

    * ``handoff="ack"``: ``put_staged`` first commits, in ONE transaction, the
      accepted messages of the fetch step (at most ``fetch_batch_size``) as *in
      flight* (each with its serialized ChannelMessage), the cursor past them and the
      decisions queued by ``skip``/``record``/``defer`` among them. Only then are they
      put on the queue, in UID order. One fsync'd transaction per step, not per
      message: a backlog drains at the speed of parsing, not of the disk.
    * ``handoff="queue"``: ``accept`` commits each message on its own the same way
      (with the settling of the message put just before), then puts it.
    * A kill before a commit: nothing of it is on disk; the next start fetches those
      messages again from the cursor (nothing lost, nothing repeated).
    * A kill after the commit: its messages are in flight, and the next start hands
      them on again with ``redelivered=True``. With ``handoff="ack"`` that is exactly
      the messages not acknowledged (a committed step whose puts the kill cut short
      included: none of them was seen, none acked); with ``handoff="queue"`` it is at
      most the one message put last (the previous ones were settled by the commit
      that preceded each next put, the last by :meth:`flush` at the end of the pass).

    A failed write (full or read-only disk, I/O error) pauses the hand-off in place:
    the same transaction is retried with backoff, nothing more is put on the queue
    and nothing already put is put again; ``on_storage`` hears the fault (and None
    once a write succeeds again), and it is logged once per fault with the path.
    Memory that depends on a write (a deferral's place in the release line) changes
    only after that write returned.
    """

    def __init__(
        self,
        store: Storage,
        account: str,
        folder: str,
        metrics: Metrics,
        *,
        handoff: str = "ack",
        on_storage: Callable[[StorageError | None], None] | None = None,
        storage_backoff: Backoff | None = None,
        ledger: HandoffLedger | None = None,
    ) -> None:
        self.store = store
        self.account = account
        self.folder = folder
        self.mailbox = Mailbox(account, folder)
        self.metrics = metrics
        self.handoff = handoff
        self.ledger = ledger or HandoffLedger(store, account, handoff=handoff)
        self.on_storage = on_storage
        self.storage_backoff = storage_backoff or Backoff(base=0.5, cap=30.0)
        self.storage_fault: StorageError | None = None
        # The fencing token of this mailbox's lease, where replicas share the state
        # (set by the channel when it starts serving the mailbox); None: no lease.
        self.fence: int | None = None
        self.uidvalidity = 0
        # False during a first start or a re-baseline: the cursor must not exist
        # half-way, or the next start would continue from it instead of redoing the pass.
        self.move_cursor = True
        self.delivered: list[int] = []  # UIDs handed on in this pass
        # (Message-ID, sender) handed on or deferred in this pass: a second copy is a
        # duplicate, refused mail never shadows.
        self._handled: set[tuple[str, str]] = set()
        self._pending: list[_Pending] = []  # decisions that ride on the next commit
        self._unsettled: list[MailKey] = []  # handoff="queue": put, settled by the next commit
        # (Message-ID, sender) put on the queue in this run and still in flight, with the
        # key of its in-flight row: redeliver() never puts one twice. Settled mail leaves
        # it (the ledger's handed_on rows find copies of it from then on), so it holds
        # what the host has not acknowledged, not every message of a long run.
        self._handed: dict[tuple[str, str], MailKey] = {}
        self._handed_keys: dict[MailKey, tuple[str, str]] = {}
        self.ledger.on_settled(self.forget_settled)
        self._staged: list[_Staged] = []  # accepted in this step, not yet committed
        self.last_handed_on_at: float | None = None  # MailboxStatus.last_message_at
        self._lock = asyncio.Lock()
        # Set on a stop: a write paused on a storage fault gives up instead of waiting
        # for a disk that may never come back (what it would have written is redone
        # or repeated at the next start, as after a kill).
        self._stopping = asyncio.Event()

    def stop_retrying(self) -> None:
        """A stop is under way: a paused state write raises its fault instead of waiting."""
        self._stopping.set()

    def resume(self) -> None:
        """A new run: paused writes wait for the storage again."""
        self._stopping.clear()

    def begin(self, uidvalidity: int, *, move_cursor: bool = True) -> None:
        """Start a pass over UIDs of ``uidvalidity``; the previous one must be flushed."""
        self.uidvalidity = uidvalidity
        self.move_cursor = move_cursor
        self.delivered = []
        self._handled = set()

    def key(self, uid: int) -> MailKey:
        """The identity of the mail at ``uid`` in this pass."""
        return MailKey(self.account, self.folder, self.uidvalidity, uid)

    def seen_in_pass(self, message_id: str, sender: str) -> bool:
        """Handed on (or deferred) in this pass, or put on the queue in this run and
        still in flight (settled mail the ledger's ``handed_on`` rows find)."""
        key = (message_id, sender)
        return key in self._handled or key in self._handed

    def _note_handed(self, pair: tuple[str, str], key: MailKey) -> None:
        self._handed[pair] = key
        self._handed_keys[key] = pair

    def forget_settled(self, keys: list[MailKey]) -> None:
        """Settled mail is no longer in flight: nothing to guard against repeating."""
        for key in keys:
            pair = self._handed_keys.pop(key, None)
            if pair is not None and self._handed.get(pair) == key:
                del self._handed[pair]

    @property
    def in_flight_count(self) -> int:
        """How many messages this run put on the queue that are not settled yet."""
        return len(self._handed)

    # --- decisions ---

    def skip(self, uid: int, message_id: str) -> None:
        """A duplicate: nothing is handed on, only the cursor moves past it."""
        self._pending.append(_Pending(Cursor(self.uidvalidity, uid)))
        self.metrics.inc("inbound.skipped.duplicate")
        log_event(log, logging.INFO, "inbound.duplicate", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code="duplicate")  # fmt: skip

    def defer(
        self,
        uid: int,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        *,
        seq: int,
        reason: str,
        arrived_at: float,
        on_durable: Callable[[], None],
    ) -> None:
        """Kept back by the rate limit or the loop guard (deferred.py): the ledger row
        (outcome ``deferred``), the waiting message and the cursor move are one
        transaction; nothing is put on the queue now. ``on_durable`` runs once that
        transaction committed (never from inside it)."""
        self._handled.add((message.id, message.sender))
        deferral = Deferral(
            key=self.key(uid),
            entry=entry or _entry_of(message),
            seq=seq,
            reason=reason,
            arrived_at=arrived_at,
            message=pack_message(message),
        )
        cursor = Cursor(self.uidvalidity, uid)
        self._pending.append(_Pending(cursor, deferral=deferral, on_durable=on_durable))

    async def hand_on_released(
        self,
        message: ChannelMessage,
        release: Release,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Hand on a message that waited (deferred.py): its release (ledger row
        delivered, deferred row gone) commits with the in-flight write, before the
        put, like any hand-off."""
        await self.hand_on(None, message, None, queue, release=release)

    async def hand_on_quarantined(
        self,
        uid: int,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Hand on a quarantined mail the operator released (``_inbound/quarantine.py``).

        One commit, before the put, like any hand-off: its ledger row becomes
        ``delivered`` with the whole entry (threading reads it once settled), it goes
        in flight, and its release request is done; the cursor stays where it is.
        A crash after that commit hands it on again at the next start (in flight);
        before it, the request is still pending and is carried out then: never both.
        """
        key = self.key(uid)
        self._handled.add((message.id, message.sender))
        item = InFlight(key, entry or _entry_of(message), pack_message(message))
        record = Record(key, message.id, DELIVERED, None, item.entry)
        await self._commit(None, item, Release(key, time.time()), record)
        await self._put(message, key, uid, queue)

    def record(
        self,
        uid: int,
        message_id: str,
        kind: str,
        reason: str,
        *,
        sender: str | None = None,
        subject: str | None = None,
    ) -> None:
        """A message not handed on (``rejected`` / ``quarantined``), with why. Sender and
        subject are kept for quarantined mail, so ``prx-email quarantine list`` can
        say whose it is without fetching it."""
        entry = None
        if kind == QUARANTINED and (sender or subject):
            sender = sender or ""
            entry = LedgerEntry(message_id, sender, sender, subject or "", "", [], time.time())
        record = Record(self.key(uid), message_id, kind, reason, entry)
        self._pending.append(_Pending(Cursor(self.uidvalidity, uid), record=record))
        # The pipeline counts its decisions (inbound.skipped.<reason>); we log the UID.
        log_event(log, logging.DEBUG, f"inbound.recorded_{kind}", account=self.account,
                  folder=self.folder, uid=uid, message_id=message_id,
                  code=reason)  # fmt: skip

    async def accept(
        self,
        uid: int,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Accepted. ``handoff="ack"``: ``message`` goes in flight with the step's
        commit (:meth:`put_staged`, or any earlier commit) and on ``queue`` right after
        it. ``"queue"``: committed and put at once (:meth:`hand_on`), which keeps that
        mode's promise that a kill repeats at most the one message being put."""
        if self.handoff != "ack":
            await self.hand_on(uid, message, entry, queue)
            return
        self._handled.add((message.id, message.sender))
        item = InFlight(self.key(uid), entry or _entry_of(message), pack_message(message))
        self._staged.append(_Staged(uid, item, message, queue))

    def forget_unwritten(self) -> None:
        """Drop every decision not yet committed (staged mail, refusals, cursor moves).

        For a mailbox this replica lost to another: the new holder decides that mail
        again from the shared cursor, so nothing is lost, and nothing of the old lease
        may be written under a new one.
        """
        self._staged.clear()
        self._pending.clear()

    async def put_staged(self) -> None:
        """Commit what :meth:`stage` collected (one transaction), then put it on the queue."""
        if self._staged:
            await self._commit(None, None, None)

    async def hand_on(
        self,
        uid: int | None,
        message: ChannelMessage,
        entry: LedgerEntry | None,
        queue: asyncio.Queue[ChannelMessage],
        *,
        release: Release | None = None,
    ) -> None:
        """Commit ``message`` as in flight, then put it on the framework's queue.

        ``uid`` None: not from this pass's folder listing (a ``release`` of deferred
        mail, keyed by it); the cursor does not move. The release is written in the
        same transaction, so both happen or neither. Messages staged meanwhile ride
        on the same commit and are put first.
        """
        mid = message.id
        self._handled.add((mid, message.sender))
        if uid is not None:
            key, cursor = self.key(uid), Cursor(self.uidvalidity, uid)
        else:
            assert release is not None, "a hand-on without a UID is a release"
            key, cursor = release.key, None
        item = InFlight(key, entry or _entry_of(message), pack_message(message))
        await self._commit(cursor, item, release)
        await self._put(message, key, uid, queue)

    async def _put(
        self,
        message: ChannelMessage,
        key: MailKey,
        uid: int | None,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Put a committed message on the queue (and remember that it went)."""
        mid = message.id
        self._note_handed((mid, message.sender), key)
        await queue.put(message)
        self.last_handed_on_at = time.time()
        if self.handoff == "queue":
            self._unsettled.append(key)
        self.metrics.inc("inbound.handed_on")
        if uid is not None:
            self.delivered.append(uid)
        log_event(log, logging.INFO, "inbound.handed_on", account=self.account,
                  folder=self.folder, uid=uid, message_id=mid)  # fmt: skip

    async def flush(self) -> None:
        """Write the decisions still pending, hand on what is staged (and settle the
        last put, queue mode)."""
        if self._pending or self._unsettled or self._staged:
            await self._commit(None, None, None)

    async def _commit(
        self,
        cursor: Cursor | None,
        item: InFlight | None,
        release: Release | None,
        record: Record | None = None,
    ) -> None:
        # One commit at a time: the release of deferred mail hands on concurrently.
        # Whatever commits first takes the staged messages along (the cursor may not
        # pass one that is not on disk) and puts them on their queue.
        async with self._lock:
            pending = list(self._pending)
            settle = list(self._unsettled)
            staged = list(self._staged)
            cursors = [p.cursor for p in pending if p.cursor is not None]
            cursors += [Cursor(self.uidvalidity, s.uid) for s in staged]
            if cursor is not None:
                cursors.append(cursor)
            cursors.sort(key=lambda c: c.last_uid)  # cursor_moves keeps the last of each
            batch = HandoffBatch(
                mailbox=self.mailbox,
                records=[p.record for p in pending if p.record is not None]
                + ([record] if record is not None else []),
                in_flight=[s.item for s in staged] + ([item] if item is not None else []),
                deferrals=[p.deferral for p in pending if p.deferral is not None],
                releases=[release] if release is not None else [],
                settle=settle,
                cursors=cursor_moves(cursors) if self.move_cursor else [],
                fence=self.fence,
            )
            try:
                await self.durable(lambda: self.store.commit_handoff(batch))
            except LeaseLost:
                # Another replica serves the mailbox now and decides these again from
                # its cursor; were they kept, a later lease of ours would commit them
                # too (a hand-off twice, or a cursor moved past mail never handed on).
                self.forget_unwritten()
                raise
            # Only now: a cancelled or failed commit leaves them for the next one.
            del self._pending[: len(pending)]
            del self._unsettled[: len(settle)]
            del self._staged[: len(staged)]
            self.forget_settled(settle)
        for p in pending:
            if p.on_durable is not None:
                p.on_durable()
        for s in staged:
            await self._put(s.message, s.item.key, s.uid, s.queue)

    # --- after a restart ---

    async def redeliver(self, queue: asyncio.Queue[ChannelMessage]) -> int:
        """Hand on again what an earlier run left in flight (``redelivered=True``)."""
        count = 0
        for row in await self.store.in_flight(self.mailbox):
            mid = row.message_id
            try:
                message = unpack_message(row.message)
            except ValueError as exc:
                log_event(log, logging.ERROR, "inbound.inflight_unreadable", exc=exc,
                          account=self.account, message_id=mid,
                          code="inflight_unreadable")  # fmt: skip
                await self.durable(functools.partial(self.store.settle, [row.key]))
                continue
            if (mid, message.sender) in self._handed:
                continue  # never twice within one run
            if self._unsettled:
                await self._commit(None, None, None)
            self._note_handed((mid, message.sender), row.key)
            await queue.put(message.model_copy(update={"redelivered": True}))
            if self.handoff == "queue":
                self._unsettled.append(row.key)
            count += 1
            self.metrics.inc("inbound.redelivered")
            log_event(log, logging.INFO, "inbound.redelivered", account=self.account,
                      folder=self.folder, message_id=mid)  # fmt: skip
        await self.flush()
        return count

    def take_acked(self, uidvalidity: int) -> list[int]:
        """UIDs of this folder settled since the last call, for the optional \\Seen / move."""
        return self.ledger.take_acked(self.mailbox, uidvalidity)

    # --- storage faults ---

    async def durable(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a state write until the storage takes it, pausing (not failing) meanwhile.

        A write refused because this replica lost the mailbox's lease is not retried:
        :class:`LeaseLost` goes up, and the mailbox stops being served here.
        """
        while True:
            try:
                result = await op()
            except LeaseLost:
                raise
            except StorageError as exc:
                self._fault(exc)
                if self._stopping.is_set():
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.storage_backoff.next())
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


def _entry_of(message: ChannelMessage) -> LedgerEntry:
    """What reply threading reads of a message handed on without a pipeline entry."""
    return LedgerEntry(message.id, message.sender, message.reply_target, message.subject,
                       message.thread_ts, list(message.references), time.time())  # fmt: skip
