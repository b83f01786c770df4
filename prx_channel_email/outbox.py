"""The outbox: every reply is stored before it is sent, and sent exactly once.

A row moves ``pending -> sending (leased) -> sent``, or to ``failed`` with the
server's reason. The composed bytes, Message-ID included, are written before
the first SMTP attempt, so a retry or a resend after a crash is byte-identical:
even if the server got the first copy, the recipient's client shows one message.

What a crash at each step means:

- before the row is written: nothing was sent, ``send()`` had not returned;
- after the row is written, before or during SMTP: the lease expires and the
  worker (this run or the next) sends it;
- after the server accepted, before ``sent`` is recorded: it is sent again with
  the same Message-ID (a duplicate at the SMTP level, one message in the client);
- after ``sent`` is recorded: never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol

from .backoff import Backoff
from .compose import Composed, Parent, compose, parent_from_ids, parse_recipient
from .config import EmailConfig
from .errors import SendError
from .message_ids import normalize_id
from .models import SendMessage
from .observability import Metrics, log_event
from .sent_folder import ImapSentFolder
from .smtp import SmtpFailure, SmtpTransport
from .store import LedgerEntry, StateStore

log = logging.getLogger(__name__)

#: Test hook, no effect unless set: with ``PRX_EMAIL_TEST_KILL_AFTER_ACCEPT=1`` the
#: process SIGKILLs itself right after the SMTP server accepted a message and
#: before the outbox records it as sent (used by tests/outbox_kill_child.py).
KILL_AFTER_ACCEPT_ENV = "PRX_EMAIL_TEST_KILL_AFTER_ACCEPT"

#: Replies with more text than this (or with attachments) are composed in a thread.
INLINE_COMPOSE_CHARS = 20_000

#: At most this long passes between the server accepting a reply and "sent" on disk
#: (unless another write carries it sooner).
SENT_FLUSH_DELAY_SECS = 0.2

#: The longest the worker sleeps without looking at the table again.
MAX_IDLE_WAIT_SECS = 60.0


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
    ) -> None:
        self.config = config
        self.store = store
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
        self._unrecorded: dict[int, _Row] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._to_store: list[tuple[Composed, asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        self._worker: asyncio.Task[None] | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the background worker; it also sends what an earlier run left pending."""
        if self._worker is not None:
            return
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
        """Stop the worker; pending items stay in the store for the next start.

        A send in flight may finish (bounded by the SMTP timeouts) so that an
        accepted message is recorded as sent rather than sent again next time.
        """
        worker, self._worker = self._worker, None
        if worker is not None:
            self._closing = True
            self._wake.set()
            grace = self.config.connect_timeout_secs + self.config.command_timeout_secs
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker), timeout=grace)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            self._closing = False
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

        Returns after the server accepted the message, or after a transient
        failure once the message is durably queued for the worker.
        """
        if time.monotonic() < self._auth_failed_until:
            raise SendError(
                f"not sending: the SMTP server {self.config.smtp_host} refused our login "
                "recently; fix the credentials and restart the channel",
                code="auth_failed",
                recipient=message.recipient,
            )
        recipient = parse_recipient(message.recipient)
        parent = await self._find_parent(message, recipient)
        build = functools.partial(
            compose,
            self.config,
            content=message.content,
            recipient=parent.reply_target if parent and parent.reply_target else recipient,
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
        return await done

    async def _commit_new(self) -> None:
        while self._to_store:
            batch, self._to_store = self._to_store, []
            recorded = self._take_unrecorded()
            rows = [c for c, _ in batch]
            try:
                ids = await self.store.run(
                    functools.partial(self._insert_rows, rows=rows, recorded=recorded)
                )
            except BaseException as exc:
                self._unrecorded.update((r.id, r) for r in recorded)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            if recorded:
                self._changed.set()
            for (_, done), row_id in zip(batch, ids, strict=True):
                if not done.done():
                    done.set_result(row_id)

    def _insert_rows(
        self, conn: sqlite3.Connection, *, rows: list[Composed], recorded: list[_Row]
    ) -> list[int]:
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
        return ids

    async def _find_parent(self, message: SendMessage, recipient: str) -> Parent | None:
        """The message this reply answers: explicit ids first, else the sender's latest."""
        account = self.config.account
        entry: LedgerEntry | None = None
        reply_id = normalize_id(message.in_reply_to)
        thread = normalize_id(message.thread_ts)
        if reply_id is not None:
            entry = await self.store.find_message(account, reply_id)
        elif thread is not None:
            entry = await self.store.latest_in_thread(account, thread)
        elif message.in_reply_to is None and message.thread_ts is None:
            entry = await self.store.latest_from(account, recipient)
        if entry is not None:
            return Parent(
                message_id=entry.message_id,
                subject=entry.subject,
                references=list(entry.references),
                reply_target=entry.reply_target,
            )
        return parent_from_ids(reply_id, thread, recipient)

    async def _attempt(self, row: _Row, *, foreground: bool) -> None:
        try:
            await self.transport.send(row.mail_from, row.recipient, row.raw)
        except SmtpFailure as failure:
            await self._failed_attempt(row, failure, foreground=foreground)
            return
        if os.environ.get(KILL_AFTER_ACCEPT_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        self.healthy = True
        # Recording "sent" rides on the next write (usually the next reply's insert),
        # so a burst costs one fsync per reply. Dying before it lands means one resend
        # with the same Message-ID: the same as dying just before recording it.
        self._unrecorded[row.id] = row
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_sent_soon())
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

    def _take_unrecorded(self) -> list[_Row]:
        rows = list(self._unrecorded.values())
        self._unrecorded.clear()
        return rows

    @staticmethod
    def _mark_sent(conn: sqlite3.Connection, rows: list[_Row]) -> None:
        now = time.time()
        conn.executemany(
            "UPDATE outbox SET state='sent', attempts=attempts+1, lease_until=NULL,"
            " last_error=NULL, smtp_code=250, updated_at=? WHERE id=?",
            [(now, r.id) for r in rows],
        )

    async def _flush_sent_soon(self) -> None:
        await asyncio.sleep(SENT_FLUSH_DELAY_SECS)
        await self._flush_sent()

    async def _flush_sent(self) -> None:
        rows = self._take_unrecorded()
        if not rows:
            return
        try:
            await self.store.run(lambda conn: self._mark_sent(conn, rows))
        except Exception as exc:  # the leases expire and they are resent with the same ids
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
        self._changed.set()

    async def _failed_attempt(self, row: _Row, failure: SmtpFailure, *, foreground: bool) -> None:
        attempts = row.attempts + 1
        now = time.time()
        if failure.auth:
            self._auth_failed_until = time.monotonic() + self._auth_holdoff_secs
        final = failure.permanent or attempts >= self.config.send_max_attempts
        if final:
            self.healthy = self.healthy and not failure.auth
            await self.store.run(
                lambda conn: conn.execute(
                    "UPDATE outbox SET state='failed', attempts=?, lease_until=NULL,"
                    " last_error=?, smtp_code=?, updated_at=? WHERE id=?",
                    (attempts, str(failure), failure.smtp_code, now, row.id),
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
                reason = (
                    str(failure)
                    if failure.permanent
                    else f"gave up after {attempts} attempt(s): {failure}"
                )
                raise SendError(
                    reason,
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
                recorded = self._take_unrecorded()
                row = await self.store.run(functools.partial(self._claim_due, recorded=recorded))
                if recorded:
                    self._changed.set()
                if row is None:
                    await self._sleep(await self.store.run(self._next_due_in))
                    continue
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

    def _claim_due(self, conn: sqlite3.Connection, *, recorded: list[_Row]) -> _Row | None:
        # Record what was sent first: a short lease must not make it look abandoned.
        self._mark_sent(conn, recorded)
        now = time.time()
        values = conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE account=? AND ("
            " (state='pending' AND next_attempt_at<=?)"
            " OR (state='sending' AND lease_until<=?))"
            " ORDER BY next_attempt_at, id LIMIT 1",
            (self.config.account, now, now),
        ).fetchone()
        if values is None:
            return None
        conn.execute(
            "UPDATE outbox SET state='sending', lease_until=?, updated_at=? WHERE id=?",
            (now + self.lease_secs, now, values[0]),
        )
        return _row(values)

    def _next_due_in(self, conn: sqlite3.Connection) -> float:
        (due,) = conn.execute(
            "SELECT min(CASE state WHEN 'pending' THEN next_attempt_at ELSE lease_until END)"
            " FROM outbox WHERE account=? AND state IN ('pending','sending')",
            (self.config.account,),
        ).fetchone()
        if due is None:
            return MAX_IDLE_WAIT_SECS
        return max(0.0, float(due) - time.time())

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
