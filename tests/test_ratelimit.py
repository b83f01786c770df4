"""The rate limits and the loop guard as pure rules (injected clock), and their table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from prx_channel_email._inbound.ratelimit import (
    LOOP_SUSPECTED,
    RATE_LIMITED,
    HandoffGate,
    Limits,
    SlidingWindow,
    Verdict,
    Waiting,
)
from prx_channel_email._mail.message_ids import MINTED_MARKER, mint_message_id, minted_at
from prx_channel_email._storage import (
    Deferral,
    HandoffBatch,
    InFlight,
    LedgerEntry,
    Mailbox,
    MailKey,
    Record,
    Release,
)
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.inbound_helpers import inbound_config

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def gate(
    clock: Clock,
    *,
    sender: int = 3,
    domain: int = 100,
    window: float = 60,
    quick_secs: float = 30,
    max_quick: int = 3,
    loop_window: float = 600,
) -> HandoffGate:
    return HandoffGate(Limits(sender, domain, window, quick_secs, max_quick, loop_window), clock)


def judge(
    g: HandoffGate,
    mid: str,
    sender: str,
    irt: str | None = None,
    refs: list[str] | None = None,
    thread: str | None = None,
) -> tuple[Verdict, Waiting | None]:
    """``g.judge`` plus what the store does once the waiting message is written."""
    # What the outbox says about the reply answered (here: its minted id's time, and
    # sent to this very sender).
    at = minted_at(irt or (refs[-1] if refs else None))
    replied = (at, sender) if at is not None else None
    verdict, waiting = g.judge(mid, sender, irt, refs, thread, replied=replied)
    if waiting is not None:
        waiting.stored = True
    return verdict, waiting


def default_limits() -> dict[str, Any]:
    """The shipped rate-limit defaults (the shared test builder lifts them)."""
    names = [n for n in EmailConfig.model_fields if "rate_limit" in n or n.startswith("loop_")]
    return {n: EmailConfig.model_fields[n].default for n in names}


def bot_reply_id(at: float) -> str:
    """A Message-ID as the channel mints it, minted at ``at``."""
    return f"<{format(int(at * 1000), 'x')}.00ff{MINTED_MARKER}@bot.example>"


def test_minted_ids_carry_their_minting_time() -> None:
    at = minted_at(mint_message_id("bot@example.net"))
    assert at is not None and abs(at - time.time()) < 5
    assert minted_at("<abc@example.com>") is None
    assert minted_at(None) is None
    assert minted_at(f"<zz.1{MINTED_MARKER}@x>") is None


def test_a_busy_sender_keeps_only_the_events_that_decide() -> None:
    """A long run under a high limit must not keep a window's worth of timestamps per
    sender and domain (a soak at 75 mail/s held one float per message for an hour):
    only the newest ``count`` + 1 are kept, and every answer stays what all of them
    would give."""
    window = SlidingWindow(count=5, window=3600)
    everything: list[float] = []
    for i in range(10_000):
        at = T0 + i * 0.1  # all within one window
        window.note("anna@example.com", at)
        everything.append(at)
        now = at + 0.05
        if i % 997 == 0 or i > 9_990:
            inside = [t for t in everything if t > now - 3600]
            expected = now if len(inside) < 5 else inside[len(inside) - 5] + 3600
            assert window.free_at("anna@example.com", now) == expected
            assert window.used("anna@example.com", now) == min(len(inside), 6)
    assert len(window.recent("anna@example.com", T0 + 1000)) == 6
    # Seeding out of order (a restart) keeps the newest too.
    window.note("anna@example.com", T0 + 5.0)
    assert window.recent("anna@example.com", T0 + 1000)[0] > T0 + 999


def test_over_the_limit_waits_and_goes_in_order_once_the_window_moves() -> None:
    clock = Clock()
    g = gate(clock)
    verdicts = [judge(g, f"<m{i}@a>", "anna@example.com") for i in range(5)]
    assert [v for v, _ in verdicts] == ["now", "now", "now", "defer", "defer"]
    assert [w.reason for _, w in verdicts[3:] if w] == [RATE_LIMITED, RATE_LIMITED]
    assert g.counts() == (2, 0)
    # Another sender is not affected.
    assert judge(g, "<b@a>", "bob@example.com")[0] == "now"
    assert g.due() == ([], [])
    assert g.next_due() == T0 + 60
    clock.now = T0 + 60
    released, _ = g.due()
    assert [w.message_id for w in released] == ["<m3@a>", "<m4@a>"]
    for w in released:
        g.released(w)
    assert g.counts() == (0, 0) and g.next_due() is None


def test_when_a_newly_waiting_message_alone_may_go() -> None:
    clock = Clock()
    g = gate(clock, sender=1, max_quick=0, loop_window=600)
    judge(g, "<1@a>", "anna@example.com")
    _, first = judge(g, "<2@a>", "anna@example.com")
    _, second = judge(g, "<3@a>", "anna@example.com")
    assert first is not None and second is not None
    assert g.due_at(first) == T0 + 60
    assert g.due_at(second) is None  # behind <2>: no earlier than the scheduler knows
    _, held = judge(g, "<4@a>", "bob@example.com", bot_reply_id(T0))
    assert held is not None and g.due_at(held) == T0 + 600
    assert g.counts() == (2, 1)


def test_a_sender_with_mail_waiting_waits_behind_it() -> None:
    clock = Clock()
    g = gate(clock, sender=1)
    assert judge(g, "<1@a>", "anna@example.com")[0] == "now"
    assert judge(g, "<2@a>", "anna@example.com")[0] == "defer"
    clock.now = T0 + 61  # the budget is back, but <2> has not been handed on yet
    assert judge(g, "<3@a>", "anna@example.com")[0] == "defer"
    released, _ = g.due()
    assert [w.message_id for w in released] == ["<2@a>"]
    g.released(released[0])
    # The next one waits for the budget <2> used, not before it.
    assert g.next_due() == clock.now + 60


def test_a_failed_release_keeps_its_place_and_its_budget() -> None:
    clock = Clock()
    g = gate(clock, sender=1)
    judge(g, "<1@a>", "anna@example.com")
    judge(g, "<2@a>", "anna@example.com")
    judge(g, "<3@a>", "anna@example.com")
    clock.now = T0 + 61
    (w,), _ = g.due()
    g.release_failed(w)
    clock.now = T0 + 122
    released, _ = g.due()
    assert [x.message_id for x in released] == ["<2@a>"]


def test_a_batch_of_25_goes_at_once_under_the_defaults(tmp_path: Path) -> None:
    clock = Clock()
    g = HandoffGate(Limits.from_config(inbound_config(tmp_path, **default_limits())), clock)
    assert {judge(g, f"<{i}@a>", "anna@example.com")[0] for i in range(25)} == {"now"}


def test_the_domain_limit_bounds_rotating_addresses() -> None:
    clock = Clock()
    g = gate(clock, sender=3, domain=5)
    verdicts = [judge(g, f"<{i}@a>", f"responder{i}@example.com")[0] for i in range(7)]
    assert verdicts == ["now"] * 5 + ["defer"] * 2
    assert judge(g, "<x@a>", "carol@other.example")[0] == "now"


def test_the_limits_hold_across_a_restart_via_seeded_handoffs() -> None:
    clock = Clock()
    g = gate(clock, sender=3)
    g.seed([("anna@example.com", T0 - 50), ("anna@example.com", T0 - 40)])
    assert [judge(g, f"<{i}@a>", "anna@example.com")[0] for i in range(2)] == ["now", "defer"]
    assert g.next_due() == T0 - 50 + 60


def test_restored_mail_keeps_its_order_and_new_mail_queues_behind_it() -> None:
    clock = Clock()
    first = gate(clock, sender=1)
    judge(first, "<1@a>", "anna@example.com")
    waiting = [judge(first, f"<{i}@a>", "anna@example.com")[1] for i in (2, 3)]
    g = gate(clock, sender=1)
    g.restore(reversed([w for w in waiting if w]))
    assert judge(g, "<4@a>", "anna@example.com")[0] == "defer"
    order = []
    for step in range(1, 4):
        clock.now = T0 + 61 * step
        released, _ = g.due()
        order += [w.message_id for w in released]
        for w in released:
            g.released(w)
    assert order == ["<2@a>", "<3@a>", "<4@a>"]


def test_quick_answers_to_bot_replies_are_held_once_a_sender_loops() -> None:
    clock = Clock()
    g = gate(clock, sender=100, max_quick=3, quick_secs=30, loop_window=600)
    verdicts = []
    for i in range(5):
        clock.now = T0 + 10 * i
        parent = bot_reply_id(clock.now - 2)  # answered two seconds after the bot's reply
        v, _ = judge(g, f"<r{i}@a>", "responder@example.com", parent, [parent])
        verdicts.append(v)
    assert verdicts == ["now", "now", "now", "hold", "hold"]
    assert g.counts() == (0, 2)
    assert g.loop_active("responder@example.com")
    # Another person of that domain writing normally, or answering quickly, is not held:
    # the loop guard counts per sender (and thread), never per domain.
    assert not g.loop_active("person@example.com")
    assert judge(g, "<p@a>", "person@example.com")[0] == "now"
    quick = bot_reply_id(clock.now - 1)
    assert judge(g, "<q@a>", "person@example.com", quick, [quick])[0] == "now"
    # Held mail keeps no one waiting, and stays held while the loop is recent.
    clock.now += 599
    assert g.due() == ([], [])
    assert g.next_due() == T0 + 40 + 600
    clock.now = T0 + 40 + 600
    released, unheld = g.due()
    assert [w.message_id for w in unheld] == ["<r3@a>", "<r4@a>"]
    assert [w.message_id for w in released] == ["<r3@a>", "<r4@a>"]
    assert not g.loop_active("responder@example.com")


def test_a_loop_across_domains_in_one_thread_is_held_by_its_thread() -> None:
    clock = Clock()
    g = gate(clock, max_quick=2, loop_window=600)
    verdicts = []
    for i in range(4):
        clock.now = T0 + 5 * i
        parent = bot_reply_id(clock.now - 1)
        sender = f"robot@domain{i}.example"  # a new domain every time, one thread
        verdicts.append(judge(g, f"<x{i}@a>", sender, parent, ["<root@a>", parent], "<root@a>")[0])
    assert verdicts == ["now", "now", "hold", "hold"]
    # Another thread of those domains is not held; the thread goes free once quiet.
    parent = bot_reply_id(clock.now - 1)
    assert judge(g, "<y@a>", "robot@domain9.example", parent, [parent], "<other@a>")[0] == "now"
    clock.now = T0 + 15 + 600
    released, unheld = g.due()
    assert (
        [w.message_id for w in unheld] == ["<x2@a>", "<x3@a>"] == [w.message_id for w in released]
    )


def test_held_mail_restored_after_a_restart_stays_held_until_quiet() -> None:
    clock = Clock()
    first = gate(clock, max_quick=0, loop_window=600)
    parent = bot_reply_id(T0 - 1)
    _, held = judge(first, "<h@a>", "robot@example.com", parent, [parent], "<t@a>")
    assert held is not None and held.held
    g = gate(clock, max_quick=0, loop_window=600)
    g.restore([held])
    assert g.counts() == (0, 1) and g.due() == ([], [])
    assert g.next_due() == T0 + 600
    clock.now = T0 + 600
    assert [w.message_id for w in g.due()[0]] == ["<h@a>"]


def test_an_answer_to_an_old_bot_reply_or_to_a_person_is_not_quick() -> None:
    clock = Clock()
    g = gate(clock, max_quick=0)
    assert judge(g, "<1@a>", "a@example.com", bot_reply_id(T0 - 31))[0] == "now"
    assert judge(g, "<2@a>", "a@example.com", "<human@example.com>")[0] == "now"
    # With max_quick=0 the first quick answer is already held.
    v, w = judge(g, "<3@a>", "b@example.com", None, [bot_reply_id(T0 - 1)])
    assert v == "hold" and w is not None and w.reason == LOOP_SUSPECTED


def _entry(mid: str, sender: str, at: float) -> LedgerEntry:
    return LedgerEntry(mid, sender, sender, "", mid, [], at)


async def test_deferred_rows_round_trip_and_handoff_history(tmp_path: Path) -> None:
    box = Mailbox("acc", "INBOX")
    clock = Clock()
    g = gate(clock, sender=1)
    judge(g, "<1@a>", "anna@example.com")
    _, w = judge(g, "<2@a>", "anna@example.com")
    assert w is not None
    msg = ChannelMessage(
        id="<2@a>",
        sender="anna@example.com",
        reply_target="anna@example.com",
        subject="Ünïcode",
        content="hi",
        timestamp=int(T0),
        thread_ts="<2@a>",
        references=["<0@a>"],
    )
    k1, k2, k3 = (MailKey("acc", "INBOX", 1, uid) for uid in (1, 2, 3))
    async with StateStore(tmp_path) as store:
        first = Record(k1, "<1@a>", "delivered", entry=_entry("<1@a>", msg.sender, T0))
        deferral = Deferral(
            k2, _entry("<2@a>", msg.sender, T0), w.seq, w.reason, w.arrived_at,
            msg.model_dump_json(),
        )  # fmt: skip
        await store.commit_handoff(HandoffBatch(box, records=[first], deferrals=[deferral]))
        await store.commit_handoff(HandoffBatch(box, deferrals=[deferral]))  # stays as it is
        (loaded,) = await store.waiting(box)
        assert (loaded.seq, loaded.message_id, loaded.reason) == (w.seq, "<2@a>", w.reason)
        assert loaded.key == k2
        assert loaded.thread == "<2@a>"  # read back from the stored message
        stored = await store.deferred_message(k2)
        assert stored is not None and ChannelMessage.model_validate_json(stored) == msg
        assert await store.recent_handoffs("acc", T0 - 1) == [("anna@example.com", T0)]
        # Released, it is also in flight (ack mode) until acknowledged: counted once.
        released = InFlight(k2, _entry("<2@a>", msg.sender, T0 + 61.5), "{}")
        await store.commit_handoff(
            HandoffBatch(box, in_flight=[released], releases=[Release(k2, T0 + 61)])
        )
        assert await store.waiting(box) == []
        # Unacknowledged fresh mail counts from the in-flight table.
        fresh = InFlight(k3, _entry("<3@a>", "bob@example.com", T0 + 70), "{}")
        await store.commit_handoff(HandoffBatch(box, in_flight=[fresh]))
        handoffs = await store.recent_handoffs("acc", T0 - 1)
        assert [sender for sender, _ in handoffs] == [
            "anna@example.com",
            "anna@example.com",
            "bob@example.com",
        ]
        assert handoffs[:2] == [("anna@example.com", T0), ("anna@example.com", T0 + 61)]
        assert await store.recent_handoffs("acc", time.time() + 60) == []  # none after then


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a@x.org", "b@x.org", "c@y.org"]), st.floats(0, 40)),
        min_size=1,
        max_size=60,
    ),
    st.integers(1, 4),
    st.integers(1, 6),
)
def test_any_arrival_pattern_goes_in_order_within_the_limits_and_completely(
    arrivals: list[tuple[str, float]], per_sender: int, per_domain: int
) -> None:
    clock = Clock()
    g = gate(clock, sender=per_sender, domain=per_domain, window=30)
    handed: list[tuple[float, str, str]] = []  # (when, sender, message id)

    def release() -> None:
        released, _ = g.due()
        for w in released:
            handed.append((clock.now, w.sender, w.message_id))
            g.released(w)

    for i, (sender, gap) in enumerate(arrivals):
        clock.now += gap
        release()
        mid = f"<{i}@t>"
        if judge(g, mid, sender)[0] == "now":
            handed.append((clock.now, sender, mid))
    while (due := g.next_due()) is not None:  # time moves on until nothing waits
        clock.now = max(clock.now, due)
        release()
    # Complete, and in arrival order per sender.
    assert sorted(m for *_, m in handed) == sorted(f"<{i}@t>" for i in range(len(arrivals)))
    for sender in {s for s, _ in arrivals}:
        mine = [int(m[1:].split("@")[0]) for _, s, m in handed if s == sender]
        assert mine == sorted(mine)
    # Within the limits in every window.
    limit_of = {"sender": per_sender, "domain": per_domain}
    for when, sender, _ in handed:
        in_window = [s for t, s, _ in handed if when - 30 < t <= when]
        assert in_window.count(sender) <= limit_of["sender"]
        dom = sender.partition("@")[2]
        assert sum(1 for s in in_window if s.endswith("@" + dom)) <= limit_of["domain"]
