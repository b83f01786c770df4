"""Deferred mail at run time: judged on arrival, kept in the state store, released in order.

The sync engine asks :meth:`DeferredMail.judge` about every message the policy
accepted. ``None`` means "hand it on now"; otherwise the message is written
(with its ledger row and the cursor move, one transaction) to the ``deferred``
table instead of being put on the queue. :meth:`DeferredMail.run` is the
release scheduler: it sleeps until the rules in ratelimit.py let the next
waiting message go, then hands it on through the sync engine's hand-off path
(commit, then put).

Crash safety, step by step:

* killed before the defer transaction: the message is still above the cursor
  and is fetched and judged again at the next start;
* after it: the message lives in the ``deferred`` table, is restored at the next
  start (same place in line) and released later; it is never fetched again;
* a release commits "handed on" (ledger ``delivered``, deferred row deleted, and
  whatever the hand-off mode writes) before the put, exactly like fresh mail.

Memory follows the disk, never leads it: a waiting message becomes releasable
(``Waiting.stored``) only once the transaction that wrote its row returned. A
failed COMMIT (a full disk) leaves it unreleasable and the hand-off retries the
same write; once that lands, the message is released in the same run.

The limits survive a restart: each sender's recent hand-offs are read back from
the ledger when the store is first used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from prx_channel_email._inbound.policy import NOT_ALLOWED
from prx_channel_email._inbound.ratelimit import LOOP_SUSPECTED, HandoffGate, Limits, Waiting
from prx_channel_email._mail.message_ids import is_minted
from prx_channel_email._storage import Mailbox, MailKey, Release, Storage
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email._support.tasks import to_completion
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage, unpack_message

log = logging.getLogger("prx_channel_email.sync")

# Hands a released message on: commits its Release with the in-flight write, then puts.
HandOn = Callable[[ChannelMessage, Release], Awaitable[None]]
# Ends a release pass: settles what it put (handoff="queue"), as the end of a sync pass does.
Settle = Callable[[], Awaitable[None]]

RETRY_SECS = 5.0  # after a failed release (a storage error): try again this much later


class DeferredMail:
    def __init__(
        self,
        config: EmailConfig,
        store: Storage,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        folder: str | None = None,
        allowed: Callable[[str], bool] | None = None,
        fence: Callable[[], int | None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.account = config.account
        self.mailbox = Mailbox(config.account, folder or config.imap_folder)
        self.clock = clock
        # The current allow-list (the policy's): asked again at release, so mail from a
        # sender removed since it arrived is refused then, never handed on.
        self.allowed = allowed
        # The fencing token of the mailbox's lease now (replicas; the hand-off's): a
        # replica that lost the mailbox must not refuse its waiting mail either.
        self.fence = fence or (lambda: None)
        self.limits = Limits.from_config(config)
        self.gate = HandoffGate(self.limits, clock)
        self._loaded = False
        self._wake = asyncio.Event()
        self._planned: float | None = None  # when the scheduler wakes next (None: on news)
        self._put = False  # this release pass put something on the queue (to settle)

    async def load(self) -> None:
        """Read waiting mail and recent hand-offs back from the store (once)."""
        if self._loaded:
            return
        account = self.account
        since = self.clock() - self.limits.window
        rows = await self.store.waiting(self.mailbox)
        recent = await self.store.recent_handoffs(account, since)
        waiting = [
            Waiting(
                r.seq,
                r.message_id,
                r.sender,
                r.arrived_at,
                held=r.reason == LOOP_SUSPECTED,
                thread=r.thread,
                key=r.key,
            )
            for r in rows
        ]
        self.gate.seed(recent)
        self.gate.restore(waiting)
        self._loaded = True
        self._gauges()
        if waiting:
            deferred, held = self.gate.counts()
            log_event(log, logging.INFO, "inbound.deferred_restored", account=account,
                      deferred=deferred, held=held)  # fmt: skip
        self._wake.set()

    # --- fresh mail ---

    async def judge(self, message: ChannelMessage, key: MailKey) -> Waiting | None:
        """None: hand ``message`` on now. Else the place in line it must be stored with
        (not releasable until :meth:`stored` says its row is on disk)."""
        verdict, waiting = self.gate.judge(
            message.id,
            message.sender,
            message.in_reply_to,
            message.references,
            message.thread_ts,
            replied=await self.replied(message),
        )
        if waiting is None:
            return None
        waiting.key = key
        if verdict == "hold":
            self.metrics.inc("inbound.held")
            log_event(log, logging.WARNING, "inbound.loop_suspected", account=self.account,
                      message_id=message.id, sender=message.sender,
                      domain=waiting.domain, thread=message.thread_ts, code=waiting.reason,
                      hold_secs=int(self.limits.loop_window))  # fmt: skip
        else:
            self.metrics.inc("inbound.deferred")
            wait = self.gate.expected_at(waiting) - self.clock()  # its own turn
            log_event(log, logging.INFO, "inbound.deferred", account=self.account,
                      message_id=message.id, sender=message.sender, code=waiting.reason,
                      release_in=f"{max(wait, 0.0):.0f}s")  # fmt: skip
        self._gauges()
        self._wake_for(waiting)
        return waiting

    async def replied(self, message: ChannelMessage) -> tuple[float, str] | None:
        """``(when stored, recipient)`` of the bot's reply ``message`` answers, if ours.

        Only a Message-ID in this account's outbox counts: one that merely looks
        minted (its timestamp is not authenticated) proves nothing. Ids that do not
        even look minted are not looked up.
        """
        parent = message.in_reply_to or (message.references[-1] if message.references else None)
        if parent is None or not is_minted(parent):
            return None
        return await self.store.outbox(self.account).sent_reply(parent)

    def counted(self, sender: str) -> None:
        """A mail handed on without being judged here (a quarantined mail the operator
        released) still counts against its sender's and its domain's limits."""
        self.gate.seed([(sender, self.clock())])

    def stored(self, waiting: Waiting) -> None:
        """The row of ``waiting`` is committed: it may be released from now on.

        Called after the COMMIT returned, never from inside the transaction: if the
        COMMIT fails, the message stays unreleasable (its sender waits) and the
        hand-off retries the same write, then calls this.
        """
        waiting.stored = True
        self._wake_for(waiting)

    # --- the release scheduler ---

    async def run(self, hand_on: HandOn, settle: Settle | None = None) -> None:
        """Hand waiting mail on as the limits allow; runs until cancelled. ``settle``
        runs after every release pass that put something (even a cancelled one), so a
        clean stop in queue mode repeats nothing."""
        await self.load()
        while True:
            try:
                delay = await self._release_pass(hand_on, settle)
                if delay is None:
                    nxt = self.gate.next_due()
                    delay = None if nxt is None else max(0.0, nxt - self.clock())
            except Exception as exc:  # a bug must not stop releases until the next restart
                self.metrics.inc("inbound.errors")
                log_event(log, logging.ERROR, "inbound.release_failed", exc=exc,
                          account=self.account, retry_in=f"{RETRY_SECS:.0f}s")  # fmt: skip
                delay = RETRY_SECS
            self._wake.clear()
            self._planned = None if delay is None else self.clock() + delay
            with contextlib.suppress(TimeoutError):
                # Woken early when new mail waits (it may be due sooner).
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _release_pass(self, hand_on: HandOn, settle: Settle | None) -> float | None:
        self._put = False
        try:
            return await self._release_due(hand_on)
        finally:
            if settle is not None and self._put:
                await to_completion(settle())

    async def _release_due(self, hand_on: HandOn) -> float | None:
        if self.allowed is not None:
            for i, w in enumerate(refused := self.gate.refused(self.allowed)):
                try:
                    await self._refuse(w)
                except BaseException:
                    for rest in refused[i:]:
                        self.gate.release_failed(rest)
                    raise
        released, unheld = self.gate.due()
        for w in unheld:
            log_event(log, logging.INFO, "inbound.loop_quiet", account=self.account,
                      message_id=w.message_id, sender=w.sender, domain=w.domain)  # fmt: skip
        for i, w in enumerate(released):
            try:
                await self._release(w, hand_on)
            except asyncio.CancelledError:
                for rest in released[i:]:
                    self.gate.release_failed(rest)
                raise
            except Exception as exc:
                for rest in released[i:]:
                    self.gate.release_failed(rest)
                self.metrics.inc("inbound.errors")
                log_event(log, logging.ERROR, "inbound.release_failed", exc=exc,
                          account=self.account, message_id=w.message_id,
                          retry_in=f"{RETRY_SECS:.0f}s")  # fmt: skip
                return RETRY_SECS
        if released or unheld:
            self._gauges()
        return None

    async def _release(self, w: Waiting, hand_on: HandOn) -> None:
        account, mid = self.account, w.message_id
        assert w.key is not None, "every waiting message is keyed by its mail"
        data = await self.store.deferred_message(w.key)
        if data is None:  # not in the store (only when removed by hand): nothing to hand on
            log_event(log, logging.ERROR, "inbound.deferred_missing", account=account,
                      message_id=mid, sender=w.sender, code="deferred_missing")  # fmt: skip
            self.gate.released(w)
            return
        message = unpack_message(data)
        at = w.handed_at  # the time the limits counted: the ledger must agree with them
        await hand_on(message, Release(w.key, at))
        self._put = True
        self.gate.released(w)
        self.metrics.inc("inbound.released")
        log_event(log, logging.INFO, "inbound.released", account=account, message_id=mid,
                  sender=w.sender, waited=f"{at - w.arrived_at:.0f}s")  # fmt: skip

    async def _refuse(self, w: Waiting) -> None:
        """``w``'s sender is no longer allowed: refused now (logged, counted), not handed on."""
        assert w.key is not None, "every waiting message is keyed by its mail"
        await self.store.refuse_waiting(w.key, NOT_ALLOWED, fence=self.fence())
        self.gate.released(w)
        self.metrics.inc(f"inbound.skipped.{NOT_ALLOWED}")
        self.metrics.inc("inbound.refused_at_release")
        log_event(log, logging.WARNING, "inbound.refused_at_release", account=self.account,
                  message_id=w.message_id, sender=w.sender, uid=w.key.uid,
                  waited=f"{self.clock() - w.arrived_at:.0f}s", code=NOT_ALLOWED)  # fmt: skip
        self._gauges()

    def _wake_for(self, waiting: Waiting) -> None:
        """Wake the scheduler if ``waiting`` may go before its planned wake-up (a
        release pass walks the whole line: not once per deferred message)."""
        if not waiting.stored:
            return  # stored() wakes it once the row is committed
        at = self.gate.due_at(waiting)
        if at is not None and (self._planned is None or at < self._planned):
            self._wake.set()

    def _gauges(self) -> None:
        deferred, held = self.gate.counts()
        self.metrics.gauge("inbound.waiting.deferred", deferred)
        self.metrics.gauge("inbound.waiting.held", held)
