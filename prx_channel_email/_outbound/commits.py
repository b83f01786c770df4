"""How the outbox batches its writes: "sent" marks and the group commit of new rows.

Both exist to save fsyncs without moving a durability line:

- :class:`SentMarks`: rows the SMTP server accepted whose "sent" mark is not on
  disk yet. The mark is written as soon as the server accepted (its own commit;
  marks that pile up while one commit runs share the next). Dying before it lands
  means one resend with the same Message-ID, so that window is kept as short as
  one commit: with ``delay_secs`` > 0 (the old behaviour, kept for the kill
  benchmark) marks wait that long for another write to carry them instead.
- :class:`GroupInsert`: replies sent concurrently share one transaction for
  their new rows; each ``send()`` still waits until its own row is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prx_channel_email._storage import NewRow, OutboxRow, OutboxStore, Stored
from prx_channel_email._support.observability import log_event

T = TypeVar("T")
log = logging.getLogger("prx_channel_email.outbox")

#: After a failed "sent" write, the next try comes this much later.
SENT_FLUSH_RETRY_SECS = 1.0


class SentMarks:
    """Accepted rows waiting for their "sent" mark, and the writes that carry them.

    ``on_recorded`` is called after marks reached the disk (waiters re-check).
    ``delay_secs`` 0 (the default) writes each mark at once; more lets marks wait
    that long for another write to carry them (fewer commits, a wider window in
    which a crash resends an accepted reply: see bench/bench_outbox_kills.py).
    """

    def __init__(
        self, table: OutboxStore, *, on_recorded: Callable[[], None], delay_secs: float = 0.0
    ) -> None:
        self.table = table
        self._on_recorded = on_recorded
        self.delay_secs = delay_secs
        self._flush_lock = asyncio.Lock()
        # Accepted by the server, "sent" not yet on disk ...
        self._unrecorded: dict[int, OutboxRow] = {}
        # ... and those whose "sent" write is under way.
        self._recording: dict[int, OutboxRow] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._timer_stopped = False

    def held_ids(self) -> list[int]:
        """Rows accepted by the server and not yet marked: nobody may claim them."""
        return [*self._unrecorded, *self._recording]

    async def record(self, row: OutboxRow) -> None:
        """The server accepted ``row``: write its mark now (or within ``delay_secs``).

        A failed write is logged and retried; it never raises (the reply is sent).
        """
        self._unrecorded[row.id] = row
        if self.delay_secs > 0:
            self._schedule_flush(self.delay_secs)
            return
        # One commit at a time; whoever gets the lock writes every mark waiting by then.
        try:
            async with self._flush_lock:
                if row.id in self._unrecorded:
                    await self.flush()
        except asyncio.CancelledError:
            self._schedule_flush(SENT_FLUSH_RETRY_SECS)  # cancelled waiting: the timer writes it
            raise

    async def write_with(self, fn: Callable[..., Awaitable[T]]) -> T:
        """Run the write ``fn(sent=rows)``, which also marks ``rows`` in its transaction.

        If it fails, the rows are kept and marked by a later write.
        """
        recorded = self._take()
        try:
            result = await fn(sent=recorded)
        except BaseException:
            self._done(recorded, ok=False)
            raise
        self._done(recorded, ok=True)
        if recorded:
            self._on_recorded()
        return result

    async def flush(self) -> None:
        """Write the pending marks now (a failure is logged; they are kept for later)."""
        rows = self._take()
        if not rows:
            return
        try:
            await self.table.mark_sent(rows)
        except Exception as exc:  # kept, and written with the next write that works
            self._done(rows, ok=False)
            log_event(
                log,
                logging.ERROR,
                "outbound.record_sent_failed",
                exc,
                account=self.table.account,
                message_id=rows[0].message_id,
                code="outbox_record_failed",
            )
            return
        except BaseException:
            self._done(rows, ok=False)
            raise
        self._done(rows, ok=True)
        self._on_recorded()

    def stop_timer(self) -> None:
        """No more delayed flushes from now on: the owner flushes itself (on close)."""
        self._timer_stopped = True

    async def cancel_timer(self) -> None:
        """Stop a delayed flush already scheduled."""
        self.stop_timer()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    def start_timer(self) -> None:
        self._timer_stopped = False

    def _take(self) -> list[OutboxRow]:
        """Rows to mark in the next write; give them back with :meth:`_done`."""
        rows = list(self._unrecorded.values())
        self._unrecorded.clear()
        self._recording.update((r.id, r) for r in rows)
        return rows

    def _done(self, rows: list[OutboxRow], *, ok: bool) -> None:
        """The write carrying ``rows`` committed (``ok``) or failed: then retry them later."""
        for r in rows:
            self._recording.pop(r.id, None)
        if not ok and rows:
            self._unrecorded.update((r.id, r) for r in rows)
            self._schedule_flush(SENT_FLUSH_RETRY_SECS)

    def _schedule_flush(self, delay: float) -> None:
        if self._timer_stopped:
            return
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher is asyncio.current_task():
            self._flusher = asyncio.create_task(self._flush_after(delay))

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.flush()


class GroupInsert:
    """New rows of concurrent ``send()`` calls, written in one transaction.

    ``hold(row_id, lease_until)`` is called for each stored row before its
    ``send()`` resumes; ``orphaned(ids)`` for rows stored for a ``send()`` that
    was cancelled meanwhile (nobody will attempt them: the worker must).
    """

    def __init__(
        self,
        table: OutboxStore,
        marks: SentMarks,
        lease_secs: float,
        *,
        hold: Callable[[int, float], None],
        orphaned: Callable[[list[int]], None],
    ) -> None:
        self.table = table
        self.marks = marks
        self.lease_secs = lease_secs
        self._hold = hold
        self._orphaned = orphaned
        self._queue: list[tuple[NewRow, asyncio.Future[Stored]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def store(self, row: NewRow) -> Stored:
        """Write ``row`` durably (leased to this process), unless its idempotency key
        is already held: then the holder comes back (``held``) and nothing is written."""
        done: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        self._queue.append((row, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit())
        try:
            return await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled() and done.exception() is None:
                stored = done.result()
                if stored.held is None:
                    # Stored, then cancelled before the attempt: hand it to the worker now.
                    self._orphaned([stored.id])
            raise

    async def _commit(self) -> None:
        while self._queue:
            # A send cancelled before its row was written stores nothing.
            batch = [(r, done) for r, done in self._queue if not done.done()]
            self._queue = []
            if not batch:
                continue
            rows = [r for r, _ in batch]
            try:
                stored, until = await self.marks.write_with(
                    functools.partial(self.table.insert, rows, self.lease_secs)
                )
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            orphans: list[int] = []
            for (_, done), row in zip(batch, stored, strict=True):
                if row.held is not None:  # not written: another send holds the key
                    if not done.done():
                        done.set_result(row)
                elif done.done():  # cancelled while the row was written: nobody will attempt it
                    orphans.append(row.id)
                else:
                    self._hold(row.id, until)
                    done.set_result(row)
            if orphans:
                self._orphaned(orphans)
