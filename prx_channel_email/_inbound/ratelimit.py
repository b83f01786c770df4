"""Rate limits and the loop guard: which accepted message is handed on now, which waits.

Pure bookkeeping (no I/O, the clock is passed in), so the rules can be tested
in microseconds and rebuilt from the state store after a restart. The hand-off
asks :meth:`HandoffGate.judge` about every message the policy accepted; the
release scheduler asks :meth:`HandoffGate.due` which waiting messages may go.

Nothing here ever drops mail. A message over a limit *waits* (``defer``); a
message that looks like one turn of a mail loop is *held* (``hold``) until the
loop has gone quiet, then waits its turn like deferred mail.

The limits, all sliding windows:

* per sender: at most ``rate_limit_count`` hand-offs in any
  ``rate_limit_window_secs``. A sender's mail is handed on in arrival order: while
  one of its messages waits, every later one waits behind it.
* per sender domain: at most ``domain_rate_limit_count`` in the same window, so
  a loop that rotates addresses inside an allowed domain is still bounded. The
  domain's free slots go round robin per sender (see :meth:`HandoffGate.due`): one
  sender's backlog never queues another sender of the domain behind it.
* the loop guard: an answer that arrives within ``loop_reply_secs`` of a reply
  this channel really sent (its Message-ID is in the outbox, and the outbox's time
  counts, never one read from the answer) is a *quick answer*. People do not read
  and answer that fast; robots do. When one sender, or one thread, sees more than
  ``loop_max_quick_replies`` quick answers within ``loop_window_secs``, further
  quick answers from that sender (or in that thread) are held (``loop_suspected``)
  until it has seen none for ``loop_window_secs``. Ordinary mail is not held, and
  one sender's answers never hold another's outside a shared thread.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._storage.interface import MailKey
from prx_channel_email.config import EmailConfig

RATE_LIMITED = "rate_limited"
LOOP_SUSPECTED = "loop_suspected"

Verdict = Literal["now", "defer", "hold"]


@dataclass(frozen=True)
class Limits:
    sender_count: int
    domain_count: int
    window: float
    loop_reply_secs: float
    loop_max_quick: int
    loop_window: float

    @classmethod
    def from_config(cls, config: EmailConfig) -> Limits:
        return cls(
            sender_count=config.rate_limit_count,
            # A domain is never held tighter than one of its senders.
            domain_count=max(config.domain_rate_limit_count, config.rate_limit_count),
            window=float(config.rate_limit_window_secs),
            loop_reply_secs=float(config.loop_reply_secs),
            loop_max_quick=config.loop_max_quick_replies,
            loop_window=float(config.loop_window_secs),
        )


@dataclass
class Waiting:
    """A message kept back: its place in line (``seq``) and whose budget it uses."""

    seq: int
    message_id: str
    sender: str
    arrived_at: float
    held: bool = False  # loop_suspected: waits for the loop to go quiet first
    releasing: bool = False  # taken by the scheduler, not yet on the queue
    # False until the transaction that stores its row has committed (set after the
    # COMMIT returned): until then it cannot be released, and its sender waits.
    stored: bool = True
    handed_at: float = 0.0  # when due() counted it against the limits

    thread: str = ""  # the conversation key (ChannelMessage.thread_ts)
    # A quick answer from an address the answered reply was not sent to (counted, and
    # held, by its domain too; not stored: after a restart it waits by sender and thread).
    rotated: bool = False
    key: MailKey | None = None  # the mail it is (its row in the store)

    @property
    def domain(self) -> str:
        return domain_of(self.sender)

    @property
    def loop_keys(self) -> list[str]:
        return loop_keys(self.sender, self.thread, rotated=self.rotated)

    @property
    def reason(self) -> str:
        return LOOP_SUSPECTED if self.held else RATE_LIMITED


def domain_of(sender: str) -> str:
    return sender.rpartition("@")[2].lower()


def loop_keys(sender: str, thread: str | None, *, rotated: bool = False) -> list[str]:
    """What quick answers are counted by: the sender, and the thread; the domain only
    for an answer from an address the answered reply was not sent to (``rotated``),
    so one sender of a domain can never hold another's answers to its own replies."""
    keys = ["sender:" + sender] + (["thread:" + thread] if thread else [])
    return keys + (["domain:" + domain_of(sender)] if rotated else [])


class SlidingWindow:
    """At most ``count`` events per key in any ``window`` seconds."""

    def __init__(self, count: int, window: float) -> None:
        self.count = count
        self.window = window
        self._stamps: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        stamps = self._stamps.get(key)
        if stamps is None:
            return deque()
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if not stamps:
            del self._stamps[key]  # forget keys that went quiet
        return stamps

    def recent(self, key: str, now: float) -> list[float]:
        """A copy of the events for ``key`` within the window, oldest first."""
        return list(self._recent(key, now))

    def used(self, key: str, now: float) -> int:
        return len(self._recent(key, now))

    def free_at(self, key: str, now: float) -> float:
        """The earliest time an event for ``key`` fits (``now`` when it fits now)."""
        stamps = self._recent(key, now)
        if len(stamps) < self.count:
            return now
        # Enough of the oldest must age out that fewer than ``count`` remain.
        return stamps[len(stamps) - self.count] + self.window

    def note(self, key: str, at: float) -> None:
        # Only the newest ``count`` + 1 events can decide anything (``free_at`` reads the
        # count-th newest, ``used`` is compared with ``count``): keeping more would hold
        # a whole window of timestamps per sender and domain under a high limit.
        stamps = self._stamps.setdefault(key, deque(maxlen=self.count + 1))
        if stamps and at < stamps[-1]:  # seeding out of order: keep the deque sorted
            ordered = sorted([*stamps, at])
            stamps.clear()
            stamps.extend(ordered)
        else:
            stamps.append(at)

    def last(self, key: str) -> float | None:
        stamps = self._stamps.get(key)
        return stamps[-1] if stamps else None


class HandoffGate:
    """Decides, per accepted message, ``now`` / ``defer`` / ``hold``, and when waiting
    mail may go. Runs on the event loop only (no locking)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self.clock = clock
        self._sender = SlidingWindow(limits.sender_count, limits.window)
        self._domain = SlidingWindow(limits.domain_count, limits.window)
        self._quick = SlidingWindow(limits.loop_max_quick, limits.loop_window)
        self._waiting: dict[int, Waiting] = {}  # by seq; dicts keep insertion order
        # Per sender: the seqs of its waiting, not held mail, in order (FIFO).
        self._lines: dict[str, list[int]] = {}
        # Per sender with mail in line: when its waiting mail last went (round robin).
        self._served: dict[str, float] = {}
        self._held = 0  # how many of _waiting are held
        self._next_seq = 1

    # --- state from the store ---

    def seed(self, handoffs: Iterable[tuple[str, float]]) -> None:
        """Recent hand-offs ``(sender, at)`` read from the ledger: the limits hold
        across a restart."""
        for sender, at in handoffs:
            self._note(sender, at)

    def restore(self, waiting: Iterable[Waiting]) -> None:
        """Deferred and held mail read from the store, in any order."""
        for w in sorted(waiting, key=lambda w: w.seq):
            w.releasing = False
            self._waiting[w.seq] = w
            self._next_seq = max(self._next_seq, w.seq + 1)
            if w.held:  # the loop was active at least until this arrived
                self._held += 1
                for key in w.loop_keys:
                    self._quick.note(key, w.arrived_at)
            else:
                self._line_add(w)
        self._waiting = dict(sorted(self._waiting.items()))

    # --- fresh mail ---

    def is_quick_answer(self, replied_at: float | None, now: float) -> bool:
        """An answer arriving within ``loop_reply_secs`` of the bot's reply it answers.
        ``replied_at``: when that reply was stored, as the outbox says (never a time
        read from the answer: a minted id's timestamp can be forged)."""
        return replied_at is not None and now - replied_at < self.limits.loop_reply_secs

    def judge(
        self,
        message_id: str,
        sender: str,
        in_reply_to: str | None = None,
        references: list[str] | None = None,
        thread: str | None = None,
        *,
        replied: tuple[float, str] | None = None,
    ) -> tuple[Verdict, Waiting | None]:
        """The verdict for one accepted message. ``now`` counts it as handed on;
        ``defer``/``hold`` put it in line (the caller stores the returned item).
        ``replied``: ``(when stored, recipient)`` of the bot's reply this answers, as
        the outbox says (``in_reply_to`` / ``references`` themselves prove nothing)."""
        now = self.clock()
        if replied is not None and self.is_quick_answer(replied[0], now):
            # Answered from an address the reply was not sent to: the mark of a
            # responder rotating addresses, counted for its domain too. A sender
            # answering its own replies is counted per sender and thread only, so no
            # one else of the domain can make its answers wait.
            rotated = fold_address(replied[1]) != fold_address(sender)
            keys = loop_keys(sender, thread, rotated=rotated)
            for key in keys:
                self._quick.note(key, now)
            if any(self._quick.used(k, now) > self.limits.loop_max_quick for k in keys):
                held = self._enqueue(message_id, sender, now, held=True, thread=thread)
                held.rotated = rotated
                return "hold", held
        if self._sender_waits(sender) or self._budget_at(sender, now) > now:
            return "defer", self._enqueue(message_id, sender, now, held=False, thread=thread)
        self._note(sender, now)
        return "now", None

    def loop_active(self, sender: str, now: float | None = None) -> bool:
        """More than the allowed quick answers from ``sender`` within the loop window."""
        at = self.clock() if now is None else now
        return self._quick.used("sender:" + sender, at) > self.limits.loop_max_quick

    # --- waiting mail ---

    def due(self) -> tuple[list[Waiting], list[Waiting]]:
        """``(released, unheld)``: waiting mail that may be handed on now (marked
        ``releasing`` and counted against the limits), in the order it goes, and held
        mail whose loop went quiet (it now waits for the rate limit like deferred mail).

        Fair within a domain (round robin per sender): each sender's mail goes in its
        own arrival order, and the next free slot goes to the sender served longest ago
        (a sender not released from this backlog yet first; then the earliest). One
        sender's backlog never queues another sender of its domain behind it: a sender
        within its own limit waits at most one round of the senders waiting with it.
        """
        now = self.clock()
        unheld: list[Waiting] = []
        for w in list(self._waiting.values()):
            if w.held and self._quiet_since(w) + self.limits.loop_window <= now:
                w.held = False
                self._held -= 1
                self._line_add(w)
                unheld.append(w)
        # Per sender whose next mail is ready: (last served, seq, sender, place in line).
        ready: list[tuple[float, int, str, int]] = []
        for sender, line in self._lines.items():
            head = self._waiting[line[0]]
            if head.releasing or not head.stored:
                continue  # its earlier mail is on the way (or not on disk yet)
            heapq.heappush(ready, (self._served.get(sender, 0.0), head.seq, sender, 0))
        released: list[Waiting] = []
        while ready:
            _, _, sender, pos = heapq.heappop(ready)
            if self._budget_at(sender, now) > now:
                continue  # the sender's or the domain's budget is used up for now
            w = self._waiting[self._lines[sender][pos]]
            w.releasing = True
            w.handed_at = now
            self._note(sender, now)
            self._served[sender] = now
            released.append(w)
            line = self._lines[sender]
            if pos + 1 < len(line) and self._waiting[line[pos + 1]].stored:
                nxt = line[pos + 1]
                heapq.heappush(ready, (now, nxt, sender, pos + 1))  # back of the round
        return released, unheld

    def refused(self, allowed: Callable[[str], bool]) -> list[Waiting]:
        """Waiting mail whose sender ``allowed`` no longer accepts (removed from the
        allow-list since it arrived), marked ``releasing``: the caller refuses it, then
        calls :meth:`released`. It uses no one's budget (checked before :meth:`due`)."""
        gone = [
            w
            for w in self._waiting.values()
            if not w.releasing and w.stored and not allowed(w.sender)
        ]
        for w in gone:
            w.releasing = True
        return gone

    def next_due(self) -> float | None:
        """When :meth:`due` may next return something (None: nothing waits)."""
        now = self.clock()
        soonest: float | None = None
        seen: set[str] = set()
        for w in self._waiting.values():
            if w.releasing or not w.stored:
                seen.add(w.sender)  # DeferredMail.stored wakes the scheduler once it is stored
                continue
            if w.held:
                at = self._quiet_since(w) + self.limits.loop_window
            elif w.sender in seen:
                continue  # it goes after the sender's first waiting message
            else:
                seen.add(w.sender)
                at = self._budget_at(w.sender, now)
            soonest = at if soonest is None else min(soonest, at)
        return soonest

    def released(self, w: Waiting) -> None:
        """``w`` is on the queue (or refused): it no longer waits."""
        if self._waiting.pop(w.seq, None) is None:
            return
        if w.held:
            self._held -= 1
        else:
            line = self._lines.get(w.sender, [])
            if w.seq in line:
                line.remove(w.seq)
            if not line:
                self._lines.pop(w.sender, None)
                self._served.pop(w.sender, None)

    def release_failed(self, w: Waiting) -> None:
        """The hand-off of ``w`` did not happen: it waits again, at its place in line.
        The budget it used stays used (a retry must not exceed the limit)."""
        w.releasing = False

    def counts(self) -> tuple[int, int]:
        """``(deferred, held)`` messages waiting now."""
        return len(self._waiting) - self._held, self._held

    def due_at(self, w: Waiting) -> float | None:
        """When ``w`` alone may go (None: only after earlier mail of its sender),
        so a newly waiting message wakes the scheduler only when it must."""
        if w.held:
            return self._quiet_since(w) + self.limits.loop_window
        if self._lines.get(w.sender, [w.seq])[0] != w.seq:
            return None
        return self._budget_at(w.sender, self.clock())

    def expected_at(self, w: Waiting) -> float:
        """When ``w`` itself is expected to go, if nothing else arrives: the sender's
        line ahead of it is released at the sender's pace (an estimate for the log,
        not a promise: other senders of its domain share the domain's budget)."""
        if w.held:
            return self._quiet_since(w) + self.limits.loop_window
        now = self.clock()
        line = self._lines.get(w.sender, [])
        ahead = line.index(w.seq) if w.seq in line else 0
        mine = self._sender.recent(w.sender, now)
        at = now
        for _ in range(ahead + 1):
            at = max(now, self._domain.free_at(domain_of(w.sender), now))
            if len(mine) >= self._sender.count:
                at = max(at, mine[len(mine) - self._sender.count] + self._sender.window)
            mine.append(at)
        return at

    # --- internals ---

    def _enqueue(
        self, message_id: str, sender: str, now: float, *, held: bool, thread: str | None
    ) -> Waiting:
        w = Waiting(
            self._next_seq, message_id, sender, now, held=held, stored=False, thread=thread or ""
        )
        self._next_seq += 1
        self._waiting[w.seq] = w
        if held:
            self._held += 1
        else:
            self._line_add(w)
        return w

    def _sender_waits(self, sender: str) -> bool:
        return bool(self._lines.get(sender))

    def _line_add(self, w: Waiting) -> None:
        bisect.insort(self._lines.setdefault(w.sender, []), w.seq)

    def _budget_at(self, sender: str, now: float) -> float:
        return max(self._sender.free_at(sender, now), self._domain.free_at(domain_of(sender), now))

    def _quiet_since(self, w: Waiting) -> float:
        """The last quick answer counted by any key that held ``w``."""
        return max(self._quick.last(key) or 0.0 for key in w.loop_keys)

    def _note(self, sender: str, at: float) -> None:
        self._sender.note(sender, at)
        self._domain.note(domain_of(sender), at)
