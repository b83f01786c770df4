"""The outbox: every reply is stored before it is sent, and sent exactly once.

A row moves ``pending -> sending (leased) -> sent``, or to ``failed`` with the
server's reason. The composed bytes, Message-ID included, are written before
the first SMTP attempt, so a retry or a resend after a crash is byte-identical:
even if the server got the first copy, the recipient's client shows one message.

What a crash at each step means:

- before the row is written: nothing was sent, ``send()`` had not returned;
- after the row is written, before or during SMTP: the lease expires and the
  worker of the next run (or of another process on the same state) sends it;
- after the server accepted, before ``sent`` is recorded: it is sent again with
  the same Message-ID (a duplicate at the SMTP level, one message in the client);
- after ``sent`` is recorded: never sent again.

Leases are for rows of a process that died. A live process never takes back a
row it is still working on: every row that a ``send()`` or the worker is
attempting, or that was accepted but is not yet recorded as sent, is in an
in-process set the worker's claim skips, however long the attempt takes. The
lease is also renewed when an attempt actually starts (after waiting its turn).

Attempts are serialised by the outbox (the transport has one connection
anyway), and the auth hold-off is checked when an attempt starts: after one
refused login, replies that were already queued fail at once (``auth_failed``)
instead of each trying the bad password again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .backoff import Backoff
from .compose import Composed, Parent, compose, parent_from_ids, parse_recipient
from .config import EmailConfig
from .errors import SendError
from .message_ids import normalize_id
from .models import SendMessage
from .observability import Metrics, log_event
from .sent_folder import ImapSentFolder
from .smtp import SmtpFailure, SmtpTransport
from .store import LedgerEntry, ParentLookup, StateStore

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Test hook, no effect unless set: with ``PRX_EMAIL_TEST_KILL_AFTER_ACCEPT=1`` the
#: process SIGKILLs itself right after the SMTP server accepted a message and
#: before the outbox records it as sent (used by tests/outbox_kill_child.py).
KILL_AFTER_ACCEPT_ENV = "PRX_EMAIL_TEST_KILL_AFTER_ACCEPT"

#: Replies with more text than this (or with attachments) are composed in a thread:
#: adversarial Markdown renders in super-linear time (20,000 chars took 0.4 s).
INLINE_COMPOSE_CHARS = 2_000

#: At most this long passes between the server accepting a reply and "sent" on disk
#: (unless another write carries it sooner).
SENT_FLUSH_DELAY_SECS = 0.2

#: The longest the worker sleeps without looking at the table again.
MAX_IDLE_WAIT_SECS = 60.0

#: After a failed "sent" write, the next try comes this much later.
SENT_FLUSH_RETRY_SECS = 1.0

#: ``last_error`` of a row that failed because its attempts ran out (every one of
#: them transient) starts with this; :meth:`Outbox.requeue_failed` revives those.
EXHAUSTED_PREFIX = "gave up after "


class SentFolder(Protocol):
    """Stores a copy of a sent reply in the account's Sent folder."""

    async def save(self, raw: bytes, message_id: str) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _Row:
    id: int
    message_id: str
    mail_from: str
    recipient: str
    raw: bytes
    attempts: int


_COLUMNS = "id, message_id, mail_from, recipient, raw, attempts"


def _row(values: Any) -> _Row:
    return _Row(values[0], values[1], values[2], values[3], bytes(values[4]), values[5])


class Outbox:
    """Compose, store and send replies; a background worker retries what failed transiently.

    ``retry_base_secs`` and ``lease_secs`` exist so tests can run retries and
    crash recovery quickly; production uses the defaults derived from the config.
    """

    def __init__(
        self,
        config: EmailConfig,
        store: StateStore,
        metrics: Metrics,
        *,
        transport: SmtpTransport | None = None,
        retry_base_secs: float = 5.0,
        lease_secs: float | None = None,
        sent_folder: SentFolder | None = None,
        parents: ParentLookup | None = None,
        on_reply_durable: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # Where reply parents are looked up (the channel shares its ledger view).
        self.parents: ParentLookup = parents or store
        # Called with the parent's Message-ID once a reply's row is committed, before
        # send() returns: the channel acknowledges the parent (handoff="ack").
        self.on_reply_durable = on_reply_durable
        self.metrics = metrics
        self.healthy = True
        self.transport = transport or SmtpTransport(config, metrics)
        if sent_folder is None and config.save_sent:
            sent_folder = ImapSentFolder(config)
        self.sent_folder = sent_folder
        self._backoff = Backoff(base=retry_base_secs, cap=float(config.send_retry_max_secs))
        # Long enough for connect + the whole SMTP transaction of the biggest message.
        self.lease_secs = lease_secs or (
            config.connect_timeout_secs + 4 * config.command_timeout_secs + 30.0
        )
        self._auth_holdoff_secs = float(config.send_retry_max_secs)
        self._auth_failed_until = 0.0
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        # Rows this process is attempting (or holds for an attempt): id -> lease end.
        # The worker never claims them, whatever their lease says.
        self._active: dict[int, float] = {}
        # Accepted by the server, "sent" not yet on disk ...
        self._unrecorded: dict[int, _Row] = {}
        # ... and those whose "sent" write is under way.
        self._recording: dict[int, _Row] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._to_store: list[tuple[Composed, asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        # One attempt at a time; the auth hold-off is checked once it is our turn.
        self._attempt_lock = asyncio.Lock()
        self._closing = False
        self._inflight = 0  # send() calls under way
        self._settled = asyncio.Event()
        self._settled.set()
        self._worker: asyncio.Task[None] | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the background worker; it also sends what an earlier run left pending."""
        if self._worker is not None:
            return
        self._closing = False
        account = self.config.account
        now = time.time()

        def recover(conn: sqlite3.Connection) -> tuple[int, int]:
            expired = conn.execute(
                "UPDATE outbox SET state='pending', lease_until=NULL, updated_at=?"
                " WHERE account=? AND state='sending' AND lease_until<=?",
                (now, account, now),
            ).rowcount
            # A start is a fresh chance: what waited for a retry goes out now.
            conn.execute(
                "UPDATE outbox SET next_attempt_at=? WHERE account=? AND state='pending'"
                " AND next_attempt_at>?",
                (now, account, now),
            )
            (pending,) = conn.execute(
                "SELECT count(*) FROM outbox WHERE account=? AND state IN ('pending','sending')",
                (account,),
            ).fetchone()
            return expired, pending

        expired, pending = await self.store.run(recover)
        if pending:
            log_event(
                log,
                logging.INFO,
                "outbox.resume",
                account=account,
                pending=pending,
                interrupted=expired,
            )
        self._worker = asyncio.create_task(self._run(), name="prx-email-outbox")

    async def close(self) -> None:
        """Stop sending; what is not sent stays in the store for the next start.

        In order: new ``send()`` calls are refused (``SendError``, code
        ``closed``); queued replies whose SMTP attempt has not started stay
        queued (their ``send()`` returns normally: they are durably queued);
        the SMTP exchanges under way (foreground or worker) get up to
        ``connect_timeout_secs + command_timeout_secs`` to finish, so an
        accepted message is recorded as sent rather than sent again next time;
        then "sent" is written and the worker stopped.

        An exchange still running when that bound expires keeps its row in
        ``sending``: the next start sends it again, with the same Message-ID
        (one message in the recipient's client, two at the SMTP level).
        """
        self._closing = True
        self._wake.set()
        worker, self._worker = self._worker, None
        grace = self.config.connect_timeout_secs + self.config.command_timeout_secs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settle(worker), timeout=grace)
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_sent()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.sent_folder is not None:
            await self.sent_folder.close()
        await self.transport.close()
        # transport.close() waited for an exchange past the bound; if it was accepted
        # meanwhile, record it now (the store is still open).
        await self._flush_sent()

    async def _settle(self, worker: asyncio.Task[None] | None) -> None:
        """Wait for the worker to stop and for every ``send()`` under way to return."""
        if worker is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(worker)
        while self._inflight:
            await self._settled.wait()

    async def wait_idle(self) -> None:
        """Return once nothing is waiting to be sent (sent or failed for good).

        Callers bound it with ``asyncio.wait_for``.
        """
        while True:
            self._changed.clear()
            if await self.pending() == 0:
                return
            await self._changed.wait()

    # --- sending ---

    async def send(self, message: SendMessage) -> str:
        """Compose, store, and try to send; returns the Message-ID. Raises SendError.

        Returns after the server accepted the message, or once the message is
        durably queued for the worker (after a transient failure, or when
        :meth:`close` began before its attempt started).

        Raises ``SendError`` for bad input, a permanent refusal, a refused login
        (also ``auth_failed`` for replies queued behind the refused one, and
        for every reply during the hold-off that follows), and with code
        ``closed`` once :meth:`close` has begun; in all these cases the reply
        will not be sent.

        Cancelling (e.g. ``asyncio.wait_for`` timing out) does NOT withdraw the
        reply once it was stored: the worker still delivers it. If the
        cancellation came before the SMTP exchange started, the row is made due
        at once and the worker sends it promptly; if it came during the
        exchange, the server may already have it, and the worker resends it
        (same Message-ID) only after the lease expires. Only a cancellation
        before the row is written means "not sent". So a caller that retries a
        cancelled send creates a second, different message.
        """
        if self._closing:
            raise SendError(
                "not sending: the email channel is closing or closed",
                code="closed",
                recipient=message.recipient,
            )
        self._inflight += 1
        self._settled.clear()
        try:
            return await self._send(message)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._settled.set()

    def _holdoff_error(self, recipient: str, message_id: str | None = None) -> SendError:
        return SendError(
            f"not sending: the SMTP server {self.config.smtp_host} refused our login "
            "recently; fix the credentials and restart the channel",
            code="auth_failed",
            recipient=recipient,
            message_id=message_id,
        )

    async def _send(self, message: SendMessage) -> str:
        if time.monotonic() < self._auth_failed_until:
            raise self._holdoff_error(message.recipient)
        recipient = parse_recipient(message.recipient)
        parent = await self._find_parent(message, recipient)
        build = functools.partial(
            compose,
            self.config,
            content=message.content,
            # Always the caller's recipient: the parent only threads the reply. (msg.reply()
            # already addresses its reply target; a Reply-To must not redirect a
            # message the framework addressed to someone explicitly.)
            recipient=recipient,
            subject=message.subject,
            parent=parent,
            attachments=list(message.attachments),
        )
        # A short text reply composes in well under a millisecond; files and long
        # texts (file I/O, bigger Markdown) go to a thread so the loop never stalls.
        if message.attachments or len(message.content) > INLINE_COMPOSE_CHARS:
            composed = await asyncio.to_thread(build)
        else:
            composed = build()
        row_id = await self._store_new(composed)
        self.metrics.inc("outbound.queued")
        if parent is not None and self.on_reply_durable is not None:
            await self.on_reply_durable(parent.message_id)
        row = _Row(
            row_id, composed.message_id, composed.mail_from, composed.recipient, composed.raw, 0
        )
        await self._attempt(row, foreground=True)
        return composed.message_id

    async def _store_new(self, composed: Composed) -> int:
        """Write the row (durably) before the first attempt; returns its id.

        Replies sent concurrently share one transaction (group commit): one fsync
        for the whole group instead of one each.
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._to_store.append((composed, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_new())
        try:
            return await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled() and done.exception() is None:
                # Stored, then cancelled before the attempt: hand it to the worker now.
                self._active.pop(done.result(), None)
                self._release_soon([done.result()])
            raise

    async def _commit_new(self) -> None:
        while self._to_store:
            # A send cancelled before its row was written stores nothing.
            batch = [(c, done) for c, done in self._to_store if not done.done()]
            self._to_store = []
            if not batch:
                continue
            rows = [c for c, _ in batch]
            try:
                ids, until = await self._write_with_sent_marks(
                    functools.partial(self._insert_rows, rows=rows)
                )
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            orphans: list[int] = []
            for (_, done), row_id in zip(batch, ids, strict=True):
                if done.done():  # cancelled while the row was written: nobody will attempt it
                    orphans.append(row_id)
                else:
                    self._active[row_id] = until
                    done.set_result(row_id)
            if orphans:
                self._release_soon(orphans)

    def _insert_rows(
        self, conn: sqlite3.Connection, *, rows: list[Composed], recorded: list[_Row]
    ) -> tuple[list[int], float]:
        self._mark_sent(conn, recorded)
        now = time.time()
        ids: list[int] = []
        for c in rows:
            cur = conn.execute(
                "INSERT INTO outbox (account, message_id, mail_from, recipient, raw, state,"
                " attempts, next_attempt_at, lease_until, created_at, updated_at)"
                " VALUES (?,?,?,?,?,'sending',0,?,?,?,?)",
                (
                    self.config.account,
                    c.message_id,
                    c.mail_from,
                    c.recipient,
                    c.raw,
                    now,
                    now + self.lease_secs,
                    now,
                    now,
                ),
            )
            assert cur.lastrowid is not None
            ids.append(cur.lastrowid)
        return ids, now + self.lease_secs

    async def _find_parent(self, message: SendMessage, recipient: str) -> Parent | None:
        """The message this reply answers: explicit ids first, else the sender's latest."""
        account = self.config.account
        entry: LedgerEntry | None = None
        reply_id = normalize_id(message.in_reply_to)
        thread = normalize_id(message.thread_ts)
        if reply_id is not None:
            entry = await self.parents.find_message(account, reply_id)
        elif thread is not None:
            entry = await self.parents.latest_in_thread(account, thread)
        elif message.in_reply_to is None and message.thread_ts is None:
            entry = await self.parents.latest_from(account, recipient)
        if entry is not None:
            return Parent(
                message_id=entry.message_id,
                subject=entry.subject,
                references=list(entry.references),
                reply_target=entry.reply_target,
            )
        return parent_from_ids(reply_id, thread, recipient)

    async def _attempt(self, row: _Row, *, foreground: bool) -> None:
        """One SMTP attempt for a row this process holds (in ``_active``).

        Waits its turn on the attempt lock; then, before any SMTP, looks again at
        the close flag and the auth hold-off (either may have changed while it
        waited) and renews the lease.
        """
        in_smtp = False
        failure: SmtpFailure | None = None
        try:
            async with self._attempt_lock:
                if self._closing:
                    await self._release([row.id])  # durably queued for the next start
                    return
                if time.monotonic() < self._auth_failed_until:
                    await self._held_off(row, foreground=foreground)
                    return
                await self._renew_lease(row)
                in_smtp = True
                try:
                    await self.transport.send(row.mail_from, row.recipient, row.raw)
                except SmtpFailure as exc:
                    failure = exc
                    if exc.auth:  # before the next queued attempt gets the lock
                        self._auth_failed_until = time.monotonic() + self._auth_holdoff_secs
                else:
                    self._accepted(row)
            if failure is not None:
                await self._failed_attempt(row, failure, foreground=foreground)
        except asyncio.CancelledError:
            if not in_smtp:
                # Cancelled before the exchange began: the worker sends it now, not
                # after the lease. (During the exchange the server may have it; the
                # lease then decides.)
                self._release_soon([row.id])
            raise
        finally:
            self._active.pop(row.id, None)

    def _accepted(self, row: _Row) -> None:
        """The server took the row's message; synchronous, so nothing can come between."""
        if os.environ.get(KILL_AFTER_ACCEPT_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        self.healthy = True
        # Recording "sent" rides on the next write (usually the next reply's insert),
        # so a burst costs one fsync per reply. Dying before it lands means one resend
        # with the same Message-ID: the same as dying just before recording it.
        self._unrecorded[row.id] = row
        self._schedule_flush(SENT_FLUSH_DELAY_SECS)
        self.metrics.inc("outbound.sent")
        self._log_row(
            logging.INFO,
            "outbound.sent",
            row,
            attempt=row.attempts + 1,
        )
        if self.sent_folder is not None:
            task = asyncio.create_task(self._save_sent(row))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _renew_lease(self, row: _Row) -> None:
        """Push the lease out when the attempt starts, if waiting used much of it.

        Only other processes look at leases (this one skips ``_active`` rows), so
        a failed write is logged and the attempt goes ahead.
        """
        now = time.time()
        if self._active.get(row.id, 0.0) - now >= self.lease_secs / 2:
            return
        until = now + self.lease_secs

        def renew(conn: sqlite3.Connection, *, recorded: list[_Row]) -> None:
            self._mark_sent(conn, recorded)
            conn.execute(
                "UPDATE outbox SET lease_until=?, updated_at=? WHERE id=? AND state='sending'",
                (until, now, row.id),
            )

        try:
            await self._write_with_sent_marks(renew)
        except Exception as exc:
            self._log_row(
                logging.WARNING, "outbox.lease_renew_failed", row, error=str(exc), code="outbox"
            )
            return
        self._active[row.id] = until

    async def _release(self, ids: list[int]) -> None:
        """Rows held but not attempted go back to ``pending``, due now, attempts unchanged."""
        now = time.time()
        await self.store.run(
            lambda conn: conn.executemany(
                "UPDATE outbox SET state='pending', lease_until=NULL, next_attempt_at=?,"
                " updated_at=? WHERE id=? AND state='sending'",
                [(now, now, i) for i in ids],
            )
        )
        self._changed.set()
        self._wake.set()

    def _release_soon(self, ids: list[int]) -> None:
        """:meth:`_release` in a task of its own (the caller is being cancelled)."""

        async def release() -> None:
            try:
                await self._release(ids)
            except Exception as exc:  # the lease expires; the worker sends it then
                log_event(
                    log,
                    logging.ERROR,
                    "outbox.release_failed",
                    exc,
                    account=self.config.account,
                    code="outbox_record_failed",
                )

        task = asyncio.create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _held_off(self, row: _Row, *, foreground: bool) -> None:
        """Our turn came during the auth hold-off: no login attempt, no attempt counted.

        A ``send()`` fails like the refused one did (its row is marked failed, and
        :meth:`requeue_failed` leaves it alone); a worker row goes back to pending
        and waits out the hold-off.
        """
        if not foreground:
            await self._release([row.id])
            return
        error = self._holdoff_error(row.recipient, row.message_id)
        now = time.time()
        await self.store.run(
            lambda conn: conn.execute(
                "UPDATE outbox SET state='failed', lease_until=NULL, last_error=?,"
                " smtp_code=NULL, updated_at=? WHERE id=?",
                (str(error), now, row.id),
            )
        )
        self._changed.set()
        self.metrics.inc("outbound.failed")
        self._log_row(
            logging.ERROR,
            "outbound.failed",
            row,
            attempt=row.attempts,
            code="auth_failed",
            error=str(error),
        )
        raise error

    def _held_ids(self) -> list[int]:
        """Rows this process holds: the worker must not claim them."""
        return [*self._active, *self._unrecorded, *self._recording]

    async def _write_with_sent_marks(self, fn: Callable[..., T]) -> T:
        """Run ``fn(conn, recorded=rows)`` as one transaction; ``fn`` also marks those
        accepted, not yet recorded rows sent (riding on a write saves an fsync per
        reply). If it fails, the rows are kept and recorded by a later write."""
        recorded = self._take_unrecorded()
        try:
            result = await self.store.run(functools.partial(fn, recorded=recorded))
        except BaseException:
            self._recorded(recorded, ok=False)
            raise
        self._recorded(recorded, ok=True)
        if recorded:
            self._changed.set()
        return result

    def _take_unrecorded(self) -> list[_Row]:
        """Rows to mark sent in the next write; give them back with :meth:`_recorded`."""
        rows = list(self._unrecorded.values())
        self._unrecorded.clear()
        self._recording.update((r.id, r) for r in rows)
        return rows

    def _recorded(self, rows: list[_Row], *, ok: bool) -> None:
        """The write carrying ``rows`` committed (``ok``) or failed: then retry them later."""
        for r in rows:
            self._recording.pop(r.id, None)
        if not ok and rows:
            self._unrecorded.update((r.id, r) for r in rows)
            self._schedule_flush(SENT_FLUSH_RETRY_SECS)

    def _schedule_flush(self, delay: float) -> None:
        if self._closing and self._worker is None:
            return  # close() flushes itself
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher is asyncio.current_task():
            self._flusher = asyncio.create_task(self._flush_sent_soon(delay))

    @staticmethod
    def _mark_sent(conn: sqlite3.Connection, rows: list[_Row]) -> None:
        now = time.time()
        conn.executemany(
            "UPDATE outbox SET state='sent', attempts=attempts+1, lease_until=NULL,"
            " last_error=NULL, smtp_code=250, updated_at=? WHERE id=? AND state!='sent'",
            [(now, r.id) for r in rows],
        )

    async def _flush_sent_soon(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._flush_sent()

    async def _flush_sent(self) -> None:
        rows = self._take_unrecorded()
        if not rows:
            return
        try:
            await self.store.run(lambda conn: self._mark_sent(conn, rows))
        except Exception as exc:  # kept, and written with the next write that works
            self._recorded(rows, ok=False)
            log_event(
                log,
                logging.ERROR,
                "outbound.record_sent_failed",
                exc,
                account=self.config.account,
                message_id=rows[0].message_id,
                code="outbox_record_failed",
            )
            return
        except BaseException:
            self._recorded(rows, ok=False)
            raise
        self._recorded(rows, ok=True)
        self._changed.set()

    async def _failed_attempt(self, row: _Row, failure: SmtpFailure, *, foreground: bool) -> None:
        attempts = row.attempts + 1
        now = time.time()
        final = failure.permanent or attempts >= self.config.send_max_attempts
        if final:
            self.healthy = self.healthy and not failure.auth
            # The prefix marks "only transient failures, attempts ran out": requeue_failed().
            error = (
                str(failure)
                if failure.permanent
                else f"{EXHAUSTED_PREFIX}{attempts} attempt(s): {failure}"
            )
            await self.store.run(
                lambda conn: conn.execute(
                    "UPDATE outbox SET state='failed', attempts=?, lease_until=NULL,"
                    " last_error=?, smtp_code=?, updated_at=? WHERE id=?",
                    (attempts, error, failure.smtp_code, now, row.id),
                )
            )
            self._changed.set()
            self.metrics.inc("outbound.failed")
            code = failure.code if failure.permanent else "send_retries_exhausted"
            self._log_row(
                logging.ERROR,
                "outbound.failed",
                row,
                attempt=attempts,
                smtp_code=failure.smtp_code,
                code=code,
                error=str(failure),
            )
            if foreground:
                raise SendError(
                    error,
                    code=code,
                    smtp_code=failure.smtp_code,
                    recipient=row.recipient,
                    message_id=row.message_id,
                )
            return
        if failure.smtp_code is None:
            self.healthy = False  # the server could not be reached at all
        delay = self._backoff.peek(attempts - 1)
        await self.store.run(
            lambda conn: conn.execute(
                "UPDATE outbox SET state='pending', attempts=?, lease_until=NULL,"
                " next_attempt_at=?, last_error=?, smtp_code=?, updated_at=? WHERE id=?",
                (attempts, now + delay, str(failure), failure.smtp_code, now, row.id),
            )
        )
        self._changed.set()
        self.metrics.inc("outbound.retries")
        self._log_row(
            logging.WARNING,
            "outbound.retry_scheduled",
            row,
            attempt=attempts,
            retry_in=round(delay, 3),
            smtp_code=failure.smtp_code,
            code=failure.code,
            error=str(failure),
        )
        self._wake.set()

    def _log_row(self, level: int, event: str, row: _Row, **fields: Any) -> None:
        log_event(
            log,
            level,
            event,
            account=self.config.account,
            message_id=row.message_id,
            recipient=row.recipient,
            **fields,
        )

    async def _save_sent(self, row: _Row) -> None:
        """Best effort: the reply is already delivered; a missing Sent copy is only logged."""
        assert self.sent_folder is not None
        try:
            await self.sent_folder.save(row.raw, row.message_id)
            self.metrics.inc("outbound.saved_to_sent")
        except Exception as exc:
            self.metrics.inc("outbound.save_sent_failed")
            log_event(
                log,
                logging.WARNING,
                "outbound.save_sent_failed",
                exc,
                account=self.config.account,
                message_id=row.message_id,
            )

    # --- the background worker ---

    async def _run(self) -> None:
        while not self._closing:
            try:
                self._wake.clear()
                holdoff = self._auth_failed_until - time.monotonic()
                if holdoff > 0:
                    await self._sleep(holdoff)
                    continue
                if self._closing:
                    return
                held = self._held_ids()
                claimed = await self._write_with_sent_marks(
                    functools.partial(self._claim_due, exclude=held)
                )
                if claimed is None:
                    due_in = functools.partial(self._next_due_in, exclude=self._held_ids())
                    await self._sleep(await self.store.run(due_in))
                    continue
                row, until = claimed
                self._active[row.id] = until
                await self._attempt(row, foreground=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the worker die; the rows are safe on disk
                log_event(
                    log,
                    logging.ERROR,
                    "outbox.worker_error",
                    exc,
                    account=self.config.account,
                    code="outbox_worker_error",
                )
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=min(seconds, MAX_IDLE_WAIT_SECS))

    def _claim_due(
        self, conn: sqlite3.Connection, *, recorded: list[_Row], exclude: Iterable[int]
    ) -> tuple[_Row, float] | None:
        """The next due row and its lease end; never one of ``exclude`` (held here)."""
        # Record what was sent first: a short lease must not make it look abandoned.
        self._mark_sent(conn, recorded)
        now = time.time()
        values = conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE account=? AND ("
            " (state='pending' AND next_attempt_at<=?)"
            " OR (state='sending' AND lease_until<=?))"
            " AND id NOT IN (SELECT value FROM json_each(?))"
            " ORDER BY next_attempt_at, id LIMIT 1",
            (self.config.account, now, now, json.dumps(list(exclude))),
        ).fetchone()
        if values is None:
            return None
        until = now + self.lease_secs
        conn.execute(
            "UPDATE outbox SET state='sending', lease_until=?, updated_at=? WHERE id=?",
            (until, now, values[0]),
        )
        return _row(values), until

    def _next_due_in(self, conn: sqlite3.Connection, *, exclude: Iterable[int] = ()) -> float:
        (due,) = conn.execute(
            "SELECT min(CASE state WHEN 'pending' THEN next_attempt_at ELSE lease_until END)"
            " FROM outbox WHERE account=? AND state IN ('pending','sending')"
            " AND id NOT IN (SELECT value FROM json_each(?))",
            (self.config.account, json.dumps(list(exclude))),
        ).fetchone()
        if due is None:
            return MAX_IDLE_WAIT_SECS
        return max(0.0, float(due) - time.time())

    async def requeue_failed(self) -> int:
        """Give replies that failed only because their attempts ran out a fresh start.

        Moves them back to ``pending`` (due now, attempt count reset) and returns
        how many. A row counts as "ran out" when its last error was recorded as
        such (``last_error`` starts with :data:`EXHAUSTED_PREFIX`) or, for rows
        written before that marker existed, when its last SMTP code was a 4xx
        (always transient). Permanent failures (5xx, refused login, TLS) and
        replies refused during the auth hold-off stay failed. Same Message-ID and
        bytes as before, so a copy the server did get earlier threads as one.
        """
        now = time.time()
        account = self.config.account
        n = await self.store.run(
            lambda conn: (
                conn.execute(
                    "UPDATE outbox SET state='pending', attempts=0, lease_until=NULL,"
                    " next_attempt_at=?, updated_at=? WHERE account=? AND state='failed'"
                    " AND (substr(last_error, 1, ?)=? OR smtp_code BETWEEN 400 AND 499)",
                    (now, now, account, len(EXHAUSTED_PREFIX), EXHAUSTED_PREFIX),
                ).rowcount
            )
        )
        if n:
            log_event(log, logging.INFO, "outbox.requeued", account=account, requeued=n)
            self._changed.set()
            self._wake.set()
        return int(n)

    async def pending(self) -> int:
        """How many messages are waiting to be sent (queued or in flight)."""
        await self._flush_sent()

        def q(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute(
                "SELECT count(*) FROM outbox WHERE account=? AND state IN ('pending','sending')",
                (self.config.account,),
            ).fetchone()
            return int(n)

        return await self.store.run(q)
