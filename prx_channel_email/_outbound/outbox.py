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
  the same Message-ID (a duplicate at the SMTP level, one message in the client).
  The mark is committed right after the 250, so this window is one commit long;
- after ``sent`` is recorded: never sent again.

A reply's path: :meth:`Outbox.send` checks size and idempotency key, finds the
parent (ledger), composes (compose.py), stores the row (:class:`GroupInsert`,
outbox_commits.py), tells the channel the reply is durable (it acks the parent),
then makes one SMTP attempt (smtp.py) and records the result (:class:`SentMarks`
or a retry/failure). SQL lives in outbox_table.py; the worker (:meth:`Outbox._run`)
retries what failed transiently. A repeated idempotency key sends nothing.

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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from prx_channel_email._handoff.ledger import HandoffLedger
from prx_channel_email._mail.message_ids import normalize_id
from prx_channel_email._net.smtp import SmtpFailure, SmtpTransport
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._outbound.commits import GroupInsert, SentMarks
from prx_channel_email._outbound.compose import (
    ComposeSettings,
    Parent,
    compose,
    parent_from_ids,
    parse_recipient,
)
from prx_channel_email._outbound.sent_folder import ImapSentFolder
from prx_channel_email._storage import (
    EXHAUSTED_PREFIX,
    LedgerEntry,
    NewRow,
    OutboxEntry,
    OutboxRow,
    Storage,
)
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import OAuthReauthRequired, SendError, StorageError
from prx_channel_email.models import SendMessage

T = TypeVar("T")
log = logging.getLogger("prx_channel_email.outbox")  # the name users filter on

#: Replies with more text than this (or with attachments) are composed in a thread:
#: adversarial Markdown renders in super-linear time (20,000 chars took 0.4 s).
INLINE_COMPOSE_CHARS = 2_000

#: Longer idempotency keys are refused (bad_input): a key is an id, not a payload.
MAX_KEY_CHARS = 512

#: How often the worker drops the text of sent replies past their retention.
PRUNE_EVERY_SECS = 3600.0

#: The longest the worker sleeps without looking at the table again.
MAX_IDLE_WAIT_SECS = 60.0
#: A queued reply whose login cannot succeed (refused password, OAuth sign-in needed)
#: looks again this often, or when the auth hold-off ends, whichever is later.
AUTH_WAIT_SECS = 20.0

__all__ = ["EXHAUSTED_PREFIX", "AuthHoldoff", "Outbox", "SentFolder"]


class SentFolder(Protocol):
    """Stores a copy of a sent reply in the account's Sent folder."""

    async def save(self, raw: bytes, message_id: str) -> None: ...

    async def close(self) -> None: ...


class AuthHoldoff:
    """After the SMTP server refused our login, no attempt logs in again for a while.

    Retrying a bad password only gets the account locked; the operator has to fix it.
    """

    def __init__(self, seconds: float, smtp_host: str) -> None:
        self.seconds = seconds
        self.smtp_host = smtp_host
        self._until = 0.0

    def remaining(self) -> float:
        return self._until - time.monotonic()

    @property
    def active(self) -> bool:
        return self.remaining() > 0

    def trip(self) -> None:
        self._until = time.monotonic() + self.seconds

    def error(self, recipient: str, message_id: str | None = None) -> SendError:
        return SendError(
            f"not sending: the SMTP server {self.smtp_host} refused our login "
            "recently; fix the credentials and restart the channel",
            code="auth_failed",
            recipient=recipient,
            message_id=message_id,
        )


class Outbox:
    """Compose, store and send replies; a background worker retries what failed transiently.

    ``retry_base_secs`` and ``lease_secs`` exist so tests can run retries and
    crash recovery quickly; production uses the defaults derived from the config.
    ``on_accepted(message_id)`` is called synchronously the moment the server
    accepted a message, before anything is recorded (crash tests kill the process there).
    Once a reply's row is committed (or a repeated send found it), before ``send()``
    returns, the parent is settled in the hand-off ``ledger`` (shared with the inbound
    flow; ``handoff="ack"``), then ``on_reply_durable(parent_message_id)`` is awaited.
    ``sent_mark_delay_secs`` > 0 brings back the batched "sent" marks (for the kill
    benchmark's comparison only).
    """

    def __init__(
        self,
        config: EmailConfig,
        store: Storage,
        metrics: Metrics,
        *,
        ledger: HandoffLedger | None = None,
        transport: SmtpTransport | None = None,
        tokens: TokenManager | None = None,
        retry_base_secs: float = 5.0,
        lease_secs: float | None = None,
        sent_folder: SentFolder | None = None,
        on_accepted: Callable[[str], None] | None = None,
        on_reply_durable: Callable[[str], Awaitable[None]] | None = None,
        sent_mark_delay_secs: float = 0.0,
    ) -> None:
        self.config = config
        self.compose_settings = ComposeSettings.from_config(config)
        self.store = store
        self.metrics = metrics
        # The SMTP side works (False after a refused login or an unreachable server) ...
        self._smtp_ok = True
        # ... and the state is writable (else the storage code of the last failure).
        self.storage_error: str | None = None
        # ``tokens``: the account's OAuth tokens, for the SMTP and the Sent folder logins.
        self.transport = transport or SmtpTransport(config, metrics, tokens=tokens)
        if sent_folder is None and config.save_sent:
            sent_folder = ImapSentFolder(config, tokens)
        self.sent_folder = sent_folder
        self._on_accepted = on_accepted
        self._on_reply_durable = on_reply_durable
        self._backoff = Backoff(base=retry_base_secs, cap=float(config.send_retry_max_secs))
        # Long enough for connect + the whole SMTP transaction of the biggest message.
        self.lease_secs = lease_secs or (
            config.connect_timeout_secs + 4 * config.command_timeout_secs + 30.0
        )
        self.table = store.outbox(config.account)
        # Where reply parents are found and settled (the channel's, shared with inbound).
        self.ledger = ledger or HandoffLedger(store, config.account, handoff=config.handoff)
        self.holdoff = AuthHoldoff(float(config.send_retry_max_secs), config.smtp_host)
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self.marks = SentMarks(
            self.table, on_recorded=self._changed.set, delay_secs=sent_mark_delay_secs
        )
        self._inserts = GroupInsert(
            self.table, self.marks, self.lease_secs, hold=self._hold, orphaned=self._orphaned
        )
        self._background: set[asyncio.Task[None]] = set()
        # Rows this process is attempting (or holds for an attempt): id -> lease end.
        # The worker never claims them, whatever their lease says.
        self._active: dict[int, float] = {}
        # One attempt at a time; the auth hold-off is checked once it is our turn.
        self._attempt_lock = asyncio.Lock()
        self._closing = False
        self._inflight = 0  # send() calls under way
        self._settled = asyncio.Event()
        self._settled.set()
        self._worker: asyncio.Task[None] | None = None
        self._next_prune = 0.0

    @property
    def healthy(self) -> bool:
        """False while the SMTP server refuses us or is unreachable, or the state
        cannot be written; True again once a send or the worker gets through."""
        return self._smtp_ok and self.storage_error is None

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the background worker; it also sends what an earlier run left pending."""
        if self._worker is not None:
            return
        self._closing = False
        self.marks.start_timer()
        expired, pending = await self.table.recover()
        await self._prune()
        if pending:
            log_event(
                log,
                logging.INFO,
                "outbox.resume",
                account=self.config.account,
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
        self.marks.stop_timer()  # close() writes the marks itself, below
        grace = self.config.connect_timeout_secs + self.config.command_timeout_secs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settle(worker), timeout=grace)
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        await self.marks.cancel_timer()
        await self.marks.flush()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.sent_folder is not None:
            await self.sent_folder.close()
        await self.transport.close()
        # transport.close() waited for an exchange past the bound; if it was accepted
        # meanwhile, record it now (the store is still open).
        await self.marks.flush()

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
        cancelled send without an ``idempotency_key`` creates a second, different
        message; with one (``ChannelMessage.reply`` sets it) the retry sends nothing.
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
        except StorageError as exc:  # after the row was stored (before it: _storing)
            raise self._storage_failure(exc, message.recipient, stored=True) from exc
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._settled.set()

    async def _send(self, message: SendMessage) -> str:
        key = message.idempotency_key
        if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
            raise SendError(
                f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters",
                code="bad_input",
                recipient=message.recipient,
            )
        size = len(message.content)
        if size > self.config.max_outbound_bytes or (
            4 * size > self.config.max_outbound_bytes
            and len(message.content.encode("utf-8", "surrogatepass"))
            > self.config.max_outbound_bytes
        ):
            raise SendError(
                f"the reply text is larger than max_outbound_bytes "
                f"({self.config.max_outbound_bytes} bytes); shorten it or attach it as a file",
                code="too_large",
                recipient=message.recipient,
            )
        recipient = parse_recipient(message.recipient)
        parent = await self._storing(self._find_parent(message), message.recipient)
        self._check_capability(parent, message.recipient)
        if key is not None:
            held = await self._storing(self.table.by_key(key), message.recipient)
            if held is not None:  # a retried send: nothing new goes out
                return await self._already_held(held, parent, key)
        if self.holdoff.active:
            raise self.holdoff.error(message.recipient)
        build = functools.partial(
            compose,
            self.compose_settings,
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
        new = NewRow(composed.message_id, composed.mail_from, composed.recipient, composed.raw, key)
        stored = await self._storing(self._inserts.store(new), message.recipient)
        self.storage_error = None  # the state is writable (again)
        if stored.held is not None:  # the same key, sent concurrently, won the race
            return await self._already_held(stored.held, parent, key or "")
        self.metrics.inc("outbound.queued")
        row = OutboxRow(stored.id, new.message_id, new.mail_from, new.recipient, new.raw, 0)
        try:
            await self._reply_durable(parent)
        except asyncio.CancelledError:
            self._orphaned([row.id])
            raise
        await self._attempt(row, foreground=True)
        return composed.message_id

    async def _storing(self, step: Awaitable[T], recipient: str) -> T:
        """A state read/write before the reply is stored: a failing disk refuses the send."""
        try:
            return await step
        except StorageError as exc:
            raise self._storage_failure(exc, recipient, stored=False) from exc

    def _storage_failure(self, exc: StorageError, recipient: str, *, stored: bool) -> SendError:
        """The store's StorageError as a SendError with the same code and path."""
        code = self.storage_error = exc.code
        log_event(
            log,
            logging.ERROR,
            "outbound.storage_failed",
            exc,
            account=self.config.account,
            recipient=recipient,
            code=code,
        )
        outcome = (
            "the reply is stored and is sent by the retry worker once the disk recovers"
            if stored
            else "the reply was not stored and nothing was sent"
        )
        return SendError(
            f"the outbox cannot write its state: {exc}; {outcome}",
            code=code,
            recipient=recipient,
        )

    async def _already_held(self, held: OutboxEntry, parent: Parent | None, key: str) -> str:
        """A send whose key the outbox holds: answer as the first send did, send nothing."""
        self.metrics.inc("outbound.duplicates_suppressed")
        log_event(
            log,
            logging.INFO,
            "outbound.duplicate_suppressed",
            account=self.config.account,
            message_id=held.message_id,
            recipient=held.recipient,
            state=held.state,
            idempotency_key=key,
        )
        await self._reply_durable(parent)
        if held.state == "failed":
            raise SendError(
                f"not sending again: the first send with this idempotency key failed: "
                f"{held.last_error}",
                code=held.error_code or "send_failed",
                smtp_code=held.smtp_code,
                recipient=held.recipient,
                message_id=held.message_id,
            )
        return held.message_id

    async def _reply_durable(self, parent: Parent | None) -> None:
        """A reply to ``parent`` is durably in the outbox: the ledger settles it (acks
        it), then the hook hears of it.

        A failure is logged: the reply goes out anyway, and an un-acked parent
        only means it is handed on again after a restart.
        """
        if parent is None:
            return
        try:
            await self.ledger.reply_durable(parent.key)
            if self._on_reply_durable is not None:
                await self._on_reply_durable(parent.message_id)
        except Exception as exc:
            log_event(
                log,
                logging.ERROR,
                "outbound.ack_failed",
                exc,
                account=self.config.account,
                message_id=parent.message_id,
                code=getattr(exc, "code", "ack_failed"),
            )

    def _hold(self, row_id: int, until: float) -> None:
        self._active[row_id] = until

    def _orphaned(self, ids: list[int]) -> None:
        """Stored rows nobody will attempt here (their send() was cancelled): worker's now."""
        for row_id in ids:
            self._active.pop(row_id, None)
        self._release_soon(ids)

    def _check_capability(self, parent: Parent | None, recipient: str) -> None:
        """An answer needs the account's "reply", a new conversation its "send"."""
        kind = "reply" if parent is not None else "send"
        if kind not in self.config.capabilities:
            raise SendError(
                f"this account may not {kind} (capabilities: "
                f"{', '.join(self.config.capabilities) or 'none'})",
                code="capability_disabled",
                recipient=recipient,
            )

    async def parent_entry(self, message: SendMessage) -> LedgerEntry | None:
        """The received mail ``message`` answers (the hand-off ledger's lookup): explicit
        ids first, else the recipient's latest. None when this account received none
        (the channel asks each account to find the one a reply leaves from)."""
        return await self.ledger.find_parent(
            reply_id=normalize_id(message.in_reply_to),
            thread=normalize_id(message.thread_ts),
            recipient=parse_recipient(message.recipient),
            explicit=message.in_reply_to is not None or message.thread_ts is not None,
        )

    async def _find_parent(self, message: SendMessage) -> Parent | None:
        """The message this reply answers: the ledger's entry, else the ids given."""
        entry = await self.parent_entry(message)
        if entry is not None:
            return Parent(
                message_id=entry.message_id,
                subject=entry.subject,
                references=list(entry.references),
                key=entry.key,
            )
        return parent_from_ids(normalize_id(message.in_reply_to), normalize_id(message.thread_ts))

    async def _attempt(self, row: OutboxRow, *, foreground: bool) -> None:
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
                if self.holdoff.active:
                    await self._held_off(row, foreground=foreground)
                    return
                await self._renew_lease(row)
                in_smtp = True
                try:
                    await self.transport.send(row.mail_from, row.recipient, row.raw)
                except SmtpFailure as exc:
                    failure = exc
                    if exc.auth:  # before the next queued attempt gets the lock
                        self.holdoff.trip()
                else:
                    self._accepted(row)
            if failure is None:
                # Outside the lock: the next reply's SMTP overlaps this commit.
                await self.marks.record(row)
            else:
                await self._failed_attempt(row, failure, foreground=foreground)
        except asyncio.CancelledError:
            if not in_smtp:
                # Cancelled before the exchange began: the worker sends it now, not
                # after the lease. (During the exchange the server may have it; the
                # lease then decides.)
                self._release_soon([row.id])
            else:
                self._wake.set()  # the worker may sleep long: let it look at the lease
            raise
        finally:
            self._active.pop(row.id, None)

    def _accepted(self, row: OutboxRow) -> None:
        """The server took the row's message; synchronous, so nothing can come between."""
        if self._on_accepted is not None:
            self._on_accepted(row.message_id)
        self._smtp_ok = True
        self.metrics.inc("outbound.sent")
        self._log_row(
            logging.INFO,
            "outbound.sent",
            row,
            attempt=row.attempts + 1,
        )
        if self.sent_folder is not None:
            self._in_background(self._save_sent(row))

    def _in_background(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_lease(self, row: OutboxRow) -> None:
        """Push the lease out when the attempt starts, if waiting used much of it.

        Only other processes look at leases (this one skips ``_active`` rows), so
        a failed write is logged and the attempt goes ahead.
        """
        now = time.time()
        if self._active.get(row.id, 0.0) - now >= self.lease_secs / 2:
            return
        until = now + self.lease_secs
        try:
            await self.marks.write_with(functools.partial(self.table.renew_lease, row.id, until))
        except Exception as exc:
            self._log_row(
                logging.WARNING, "outbox.lease_renew_failed", row, error=str(exc), code="outbox"
            )
            return
        self._active[row.id] = until

    async def _release(self, ids: list[int]) -> None:
        """Rows held but not attempted go back to ``pending``, due now, attempts unchanged."""
        await self.table.release(ids)
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

        self._in_background(release())

    async def _held_off(self, row: OutboxRow, *, foreground: bool) -> None:
        """Our turn came during the auth hold-off: no login attempt, no attempt counted.

        A ``send()`` fails like the refused one did (its row is marked failed, and
        :meth:`requeue_failed` leaves it alone); a worker row goes back to pending
        and waits out the hold-off.
        """
        if not foreground:
            await self._release([row.id])
            return
        error = self.holdoff.error(row.recipient, row.message_id)
        await self.table.fail(row.id, str(error), code=error.code, smtp_code=None)
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
        return [*self._active, *self.marks.held_ids()]

    async def _failed_attempt(
        self, row: OutboxRow, failure: SmtpFailure, *, foreground: bool
    ) -> None:
        if not foreground and (failure.auth or failure.code == OAuthReauthRequired.code):
            await self._wait_for_login(row, failure)
            return
        attempts = row.attempts + 1
        final = failure.permanent or attempts >= self.config.send_max_attempts
        if final:
            self._smtp_ok = self._smtp_ok and not failure.auth
            # The prefix marks "only transient failures, attempts ran out": requeue_failed().
            error = (
                str(failure)
                if failure.permanent
                else f"{EXHAUSTED_PREFIX}{attempts} attempt(s): {failure}"
            )
            code = failure.code if failure.permanent else "send_retries_exhausted"
            await self.table.fail(
                row.id, error, code=code, attempts=attempts, smtp_code=failure.smtp_code
            )
            self._changed.set()
            self.metrics.inc("outbound.failed")
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
            self._smtp_ok = False  # the server could not be reached at all
        delay = self._backoff.peek(attempts - 1)
        await self._retry_later(row, attempts, delay, failure, "outbound.retries",
                                "outbound.retry_scheduled", attempt=attempts)  # fmt: skip

    async def _wait_for_login(self, row: OutboxRow, failure: SmtpFailure) -> None:
        """A queued reply met a login the account cannot make (refused password, OAuth grant
        gone). That is no fault of the reply: it waits, its attempts unchanged, instead of
        failing where nobody would see it, and goes out once a login works again."""
        self._smtp_ok = False
        delay = max(self.holdoff.remaining(), AUTH_WAIT_SECS)
        await self._retry_later(row, row.attempts, delay, failure, "outbound.waiting_for_login",
                                "outbound.waiting_for_login")  # fmt: skip

    async def _retry_later(
        self,
        row: OutboxRow,
        attempts: int,
        delay: float,
        failure: SmtpFailure,
        counter: str,
        event: str,
        **fields: Any,
    ) -> None:
        """Put ``row`` back in the queue, due in ``delay`` s with ``attempts`` counted."""
        await self.table.retry_later(row.id, attempts, delay, str(failure), failure.smtp_code)
        self._changed.set()
        self.metrics.inc(counter)
        self._log_row(
            logging.WARNING,
            event,
            row,
            **fields,
            retry_in=round(delay, 3),
            smtp_code=failure.smtp_code,
            code=failure.code,
            error=str(failure),
        )
        self._wake.set()

    def _log_row(self, level: int, event: str, row: OutboxRow, **fields: Any) -> None:
        log_event(
            log,
            level,
            event,
            account=self.config.account,
            message_id=row.message_id,
            recipient=row.recipient,
            **fields,
        )

    async def _save_sent(self, row: OutboxRow) -> None:
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
                holdoff = self.holdoff.remaining()
                if holdoff > 0:
                    await self._sleep(holdoff)
                    continue
                if self._closing:
                    return
                if time.monotonic() >= self._next_prune:
                    await self._prune()
                claimed = await self.marks.write_with(
                    functools.partial(self.table.claim_due, self._held_ids(), self.lease_secs)
                )
                if claimed is None:
                    due_in = await self.table.next_due_in(self._held_ids(), MAX_IDLE_WAIT_SECS)
                    await self._sleep(min(due_in, self._next_prune - time.monotonic()))
                    continue
                row, until = claimed
                self.storage_error = None  # the claim wrote: the state is writable (again)
                self._active[row.id] = until
                await self._attempt(row, foreground=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the worker die; the rows are safe on disk
                if isinstance(exc, StorageError):
                    self.storage_error = exc.code
                log_event(
                    log,
                    logging.ERROR,
                    "outbox.worker_error",
                    exc,
                    account=self.config.account,
                    code="outbox_worker_error",
                )
                await self._sleep(1.0)

    async def _prune(self) -> None:
        """The account's state housekeeping: drop the stored text of replies sent longer
        ago than ``outbox_retention_days``, and the ledger's records of refused mail
        older than ``refused_retention_days`` (:meth:`HandoffLedger.prune_refused`).

        An outbox row stays (Message-ID, idempotency key, state): a repeated send still
        finds it. Failed rows keep their text (``prx-email outbox retry`` needs it).
        """
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECS
        cutoff = time.time() - self.config.outbox_retention_days * 86400
        try:
            pruned = await self.table.prune_sent(cutoff)
            if pruned:
                log_event(log, logging.INFO, "outbox.pruned", account=self.config.account,
                          pruned=pruned)  # fmt: skip
            await self.ledger.prune_refused(self.config.refused_retention_days)
        except Exception as exc:  # retried at the next interval; nothing depends on it
            log_event(
                log,
                logging.WARNING,
                "outbox.prune_failed",
                exc,
                account=self.config.account,
                code=getattr(exc, "code", "storage_error"),
            )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=min(seconds, MAX_IDLE_WAIT_SECS))

    async def requeue_failed(self) -> int:
        """Give replies that failed only because their attempts ran out a fresh start.

        Moves them back to ``pending`` (due now, attempt count reset) and returns
        how many (see :meth:`OutboxTable.requeue_exhausted` for which count).
        Permanent failures (5xx, refused login, TLS) and replies refused during
        the auth hold-off stay failed. Same Message-ID and bytes as before, so a
        copy the server did get earlier threads as one.
        """
        n = await self.table.requeue_exhausted()
        if n:
            log_event(log, logging.INFO, "outbox.requeued", account=self.config.account, requeued=n)
            self._changed.set()
            self._wake.set()
        return n

    async def pending(self) -> int:
        """How many messages are waiting to be sent (queued or in flight)."""
        await self.marks.flush()
        return await self.table.pending()
