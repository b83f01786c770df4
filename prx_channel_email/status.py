"""What the channel tells its host: its state, and the mail it refused.

The sync engine and the SMTP login check report transitions to one
:class:`StatusReporter`; it keeps the current :class:`ChannelStatus`, calls the
host's ``on_status`` callback on every change (so nothing has to poll), and
answers ``wait_ready``. A failure is *permanent* when retrying cannot help
without someone acting (a refused password, an untrusted certificate, a missing
folder): ``wait_ready`` raises it at once instead of waiting for its timeout.
The engine still retries, slowly, so a fix on the server side is picked up.

``on_rejected`` receives a :class:`RejectedMessage` for each message the policy
refused, so a host can run its own pairing flow ("a new person wrote; allow?")
with ``allow_sender`` instead of keeping a second allow-list. A flood of refused
mail must not cost the channel per mail: the events wait in a bounded queue
(:data:`REJECTED_QUEUE_MAX`; more are dropped, counted in ``on_rejected.dropped``
and logged), one callback runs at a time, and a plain (sync) callback runs in a
worker thread, so one that blocks never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.errors import ChannelError, NotReadyError

log = logging.getLogger("prx_channel_email.status")

#: Refused-mail events waiting for the host's on_rejected; more are dropped (counted).
REJECTED_QUEUE_MAX = 1000

_E = TypeVar("_E")

# Codes after which a retry does not help until someone acts.
PERMANENT_CODES = frozenset(
    {
        "auth_failed",
        "auth_unsupported",
        "login_disabled",
        "oauth_reauth_required",
        "tls_verify_failed",
        "starttls_unavailable",
        "folder_missing",
        "insecure_refused",
        "smtp_not_supported",
        "imap_library_incompatible",
        "config_invalid",
    }
)


class ChannelState(enum.StrEnum):
    """``starting`` until the first connection; ``connected`` once IMAP has the folder
    selected and the SMTP login was checked; ``reconnecting`` after a failure that
    may pass by itself; ``failed`` after one that needs someone to act; ``closed``."""

    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class ChannelStatus:
    """One snapshot of the channel's state (immutable; a new one per change).

    ``code`` and ``message`` describe the failure behind ``reconnecting`` or
    ``failed`` (``auth_failed``, ``tls_verify_failed``, ``folder_missing`` ...);
    ``component`` says which side it is on (``"imap"`` or ``"smtp"``);
    ``retry_in`` is when the next attempt is due, in seconds, when known.
    """

    state: ChannelState = ChannelState.STARTING
    imap_ready: bool = False
    smtp_ready: bool = False
    code: str | None = None
    message: str | None = None
    component: str | None = None
    retry_in: float | None = None
    since: float = 0.0
    # The mailbox this is about (several mailboxes: one status each); None for the
    # whole channel.
    account: str | None = None
    folder: str | None = None

    @property
    def ready(self) -> bool:
        return self.state is ChannelState.CONNECTED


StatusCallback = Callable[[ChannelStatus], Awaitable[None] | None]


class MailboxStatus(BaseModel):
    """One mailbox (an account's folder) as ``EmailChannel.mailboxes()`` reports it.

    A snapshot built on demand, so it costs nothing per mailbox while nobody asks.
    ``state`` is ``connected`` when logged in with the folder selected, ``failed``
    (with ``code``) after a failure that needs someone to act. ``idling``: in IDLE
    right now, waiting for a push. ``last_message_at``: Unix seconds of the last
    hand-off from this mailbox in this run. ``replica``: the process serving it,
    when known (shared state). It is plain JSON: the ``/status`` endpoint serves it.
    """

    model_config = ConfigDict(frozen=True)

    account: str
    folder: str
    state: ChannelState
    code: str | None = None
    message: str | None = None
    idling: bool = False
    last_message_at: float | None = None
    last_sync_at: float | None = None
    replica: str | None = None
    # False when replicas share the state and this process does not hold the
    # mailbox's lease: another replica serves it (``replica``), or nobody does yet.
    here: bool = True

    @property
    def healthy(self) -> bool:
        """Serving mail right now (what ``/healthz`` asks of every mailbox this process
        serves; a mailbox another replica serves is that replica's to report)."""
        return self.state is ChannelState.CONNECTED or not self.here


@dataclass(frozen=True)
class RejectedMessage:
    """A message the policy refused (never handed on).

    ``reason`` is the policy's code: ``not_allowed`` (the sender is not on the
    allow-list), ``unverified`` (allowed, but no trusted server vouched for it),
    ``auto_submitted``, ``mailing_list``, ... ; ``detail`` explains it. ``id`` is
    the Message-ID, as ``ChannelMessage.id`` would have been.
    """

    id: str
    sender: str
    subject: str
    reason: str
    detail: str = ""


RejectedCallback = Callable[[RejectedMessage], Awaitable[None] | None]


def failure_code(exc: BaseException) -> str:
    return str(getattr(exc, "code", None) or type(exc).__name__)


def is_permanent(exc: BaseException) -> bool:
    """A failure that retrying will not fix (an SmtpFailure says so itself)."""
    return getattr(exc, "permanent", None) is True or failure_code(exc) in PERMANENT_CODES


class StatusReporter:
    """Collects the IMAP and SMTP sides' reports into one :class:`ChannelStatus`."""

    def __init__(
        self,
        account: str,
        on_status: StatusCallback | None = None,
        on_rejected: RejectedCallback | None = None,
        *,
        metrics: Metrics | None = None,
        name: str | None = None,
        folder: str | None = None,
    ) -> None:
        """``account`` keys the logs; ``name``/``folder`` name the mailbox in the
        statuses it reports and on the errors ``wait_ready`` raises."""
        self.account = account
        self.name = name
        self.folder = folder
        self._on_status = on_status
        self._on_rejected = on_rejected
        self._metrics = metrics or Metrics()
        self._rejected: collections.deque[RejectedMessage] = collections.deque()
        self._rejected_waiting = asyncio.Event()
        self._rejected_feed: asyncio.Task[None] | None = None
        self._rejected_overflowing = False
        self._status = ChannelStatus(since=time.time(), account=name, folder=folder)
        self._changed = asyncio.Event()  # set and replaced on every change
        self._imap_failure: tuple[ChannelState, str, str, float | None] | None = None
        self._smtp_failure: tuple[ChannelState, str, str, float | None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> ChannelStatus:
        return self._status

    # --- reports ---

    def imap_ready(self) -> None:
        """Logged in, folder selected."""
        self._imap_failure = None
        self._update(imap_ready=True)

    def imap_failed(
        self, exc: BaseException, retry_in: float | None, *, permanent: bool = False
    ) -> None:
        """``permanent``: nothing will retry (listen() itself gave up)."""
        lasting = permanent or is_permanent(exc)
        state = ChannelState.FAILED if lasting else ChannelState.RECONNECTING
        self._imap_failure = (state, failure_code(exc), str(exc), retry_in)
        self._update(imap_ready=False)

    def smtp_ready(self) -> None:
        """The SMTP login succeeded."""
        self._smtp_failure = None
        self._update(smtp_ready=True)

    def smtp_failed(self, exc: BaseException, retry_in: float | None) -> None:
        state = ChannelState.FAILED if is_permanent(exc) else ChannelState.RECONNECTING
        self._smtp_failure = (state, failure_code(exc), str(exc), retry_in)
        self._update(smtp_ready=False)

    def rejected(
        self, message_id: str, sender: str | None, subject: str | None, reason: str, detail: str
    ) -> None:
        """The policy refused a message: queue it for the host (after a crash, maybe
        again). Never waits: when the queue is full the event is dropped and counted."""
        if self._on_rejected is None:
            return
        if len(self._rejected) >= REJECTED_QUEUE_MAX:
            self._metrics.inc("on_rejected.dropped")
            if not self._rejected_overflowing:  # once per overflow, not per mail
                self._rejected_overflowing = True
                log_event(log, logging.WARNING, "channel.on_rejected_overflow",
                          account=self.account, waiting=len(self._rejected),
                          dropped=self._metrics.get("on_rejected.dropped"),
                          code="on_rejected_overflow")  # fmt: skip
            return
        self._rejected.append(
            RejectedMessage(message_id, sender or "", subject or "", reason, detail)
        )
        self._rejected_waiting.set()
        if self._rejected_feed is None or self._rejected_feed.done():
            self._rejected_feed = asyncio.ensure_future(self._feed_rejected(self._on_rejected))

    @property
    def rejected_waiting(self) -> int:
        """Refused-mail events not yet given to ``on_rejected``."""
        return len(self._rejected)

    async def _feed_rejected(self, callback: RejectedCallback) -> None:
        """The one consumer: each event to the callback in turn, a sync one in a thread."""
        is_async = inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)  # noqa: B004 - an object with async __call__
        )
        while True:
            while not self._rejected:
                self._rejected_overflowing = False
                self._rejected_waiting.clear()
                await self._rejected_waiting.wait()
            event = self._rejected.popleft()
            try:
                if is_async:
                    result: object = callback(event)
                else:
                    result = await asyncio.to_thread(callback, event)
                if inspect.isawaitable(result):  # a sync function returning an awaitable
                    await result
            except Exception as exc:
                log_event(log, logging.ERROR, "channel.on_rejected_failed", exc=exc,
                          account=self.account, code="callback_error")  # fmt: skip

    def closed(self) -> None:
        if self._rejected_feed is not None:
            self._rejected_feed.cancel()
        self._imap_failure = self._smtp_failure = None
        self._update(imap_ready=False, smtp_ready=False, closed=True)

    # --- waiting ---

    async def wait_ready(self, timeout: float) -> ChannelStatus:  # noqa: ASYNC109 (the contract)
        """Until connected; raises the permanent failure at once, NotReadyError at ``timeout``."""
        settled = (ChannelState.CONNECTED, ChannelState.FAILED, ChannelState.CLOSED)
        try:
            async with asyncio.timeout(timeout):
                while self._status.state not in settled:
                    await self._changed.wait()
        except TimeoutError:
            status = self._status
            detail = f" (last problem: {status.code}: {status.message})" if status.code else ""
            error = NotReadyError(
                f"the channel was not ready within {timeout:g} s{detail}", status=status
            )
            error.account = self.name
            raise error from None
        status = self._status
        if status.state is ChannelState.CONNECTED:
            return status
        if status.state is ChannelState.CLOSED:
            raise ChannelError("the channel was closed", code="closed")
        failure = ChannelError(status.message or "the channel failed", code=status.code or "failed")
        failure.account = self.name
        raise failure

    # --- internals ---

    def _update(
        self,
        *,
        imap_ready: bool | None = None,
        smtp_ready: bool | None = None,
        closed: bool = False,
    ) -> None:
        old = self._status
        imap = old.imap_ready if imap_ready is None else imap_ready
        smtp = old.smtp_ready if smtp_ready is None else smtp_ready
        # A permanent failure on either side outranks a passing one on the other.
        failures = [f for f in (self._imap_failure, self._smtp_failure) if f is not None]
        failures.sort(key=lambda f: f[0] is not ChannelState.FAILED)
        code = message = component = None
        retry_in: float | None = None
        if closed:
            state = ChannelState.CLOSED
        elif failures:
            state, code, message, retry_in = failures[0]
            component = "imap" if failures[0] is self._imap_failure else "smtp"
        elif imap and smtp:
            state = ChannelState.CONNECTED
        else:  # a side not checked yet, nothing wrong so far
            state = ChannelState.STARTING
        new = ChannelStatus(
            state, imap, smtp, code, message, component, retry_in, old.since,
            account=self.name, folder=self.folder,
        )  # fmt: skip
        if replace(new, retry_in=None, since=0.0) == replace(old, retry_in=None, since=0.0):
            return  # nothing a host would show changed
        new = replace(new, since=time.time())
        self._status = new
        log_event(log, logging.INFO, "channel.status", account=self.account,
                  state=new.state.value, code=new.code)  # fmt: skip
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._on_status is not None:
            self._dispatch(self._on_status, new, "channel.on_status_failed")

    def _dispatch(
        self, callback: Callable[[_E], Awaitable[None] | None], event: _E, what: str
    ) -> None:
        """Call the host's callback; an async one runs as a task. Its errors are logged:
        a bug in the host must not stop the channel."""
        try:
            result = callback(event)
        except Exception as exc:
            log_event(log, logging.ERROR, what, exc=exc, account=self.account,
                      code="callback_error")  # fmt: skip
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._guarded(result, what))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _guarded(self, result: Awaitable[None], what: str) -> None:
        try:
            await result
        except Exception as exc:
            log_event(log, logging.ERROR, what, exc=exc, account=self.account,
                      code="callback_error")  # fmt: skip
