"""One allowed sender against another, as pure rules (injected clock): what the log
says about a deferred message, and fairness within a domain."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from prx_channel_email._inbound.deferred import DeferredMail
from prx_channel_email._storage import MailKey
from prx_channel_email._support.observability import Metrics
from prx_channel_email.models import ChannelMessage
from tests.inbound_helpers import inbound_config
from tests.test_ratelimit import T0, Clock, gate, judge

ALICE = "alice@example.com"


def message(n: int, sender: str) -> ChannelMessage:
    mid = f"<m{n}@example.com>"
    return ChannelMessage(id=mid, sender=sender, reply_target=sender, timestamp=0, thread_ts=mid)


async def test_the_deferred_log_names_each_messages_own_release_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One per 30 s: the second waits 30 s, the third 60 s (not the scheduler's next
    wake-up, which is 30 s for both)."""
    clock = Clock()
    config = inbound_config(tmp_path, rate_limit_count=1, rate_limit_window_secs=30)
    deferred = DeferredMail(config, None, Metrics(), clock)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, "prx_channel_email.sync")
    verdicts = [
        await deferred.judge(message(n, ALICE), MailKey("a", "INBOX", 1, n)) for n in range(3)
    ]
    assert verdicts[0] is None
    logged = [r.getMessage() for r in caplog.records if "inbound.deferred" in r.getMessage()]
    assert len(logged) == 2
    assert "release_in=30s" in logged[0]
    assert "release_in=60s" in logged[1]


def test_a_quiet_sender_is_not_queued_behind_a_busy_senders_backlog_in_one_domain() -> None:
    """Three addresses of one domain each stay within their own limit (one mail per
    10 s, three per 30 s allowed) but together send three times the domain's budget:
    a backlog grows. Alice's one mail still goes at the domain's next free slot, within
    one window of its arrival, not after the backlog; the domain cap still holds."""
    clock = Clock()
    g = gate(clock, sender=3, domain=3, window=30)
    handed: list[tuple[float, str, str]] = []

    def release() -> None:
        released, _ = g.due()
        for w in released:
            handed.append((clock.now, w.sender, w.message_id))
            g.released(w)

    def advance_to(t: float) -> None:
        while (due := g.next_due()) is not None and due <= t:
            clock.now = max(clock.now, due)
            release()
        clock.now = t
        release()

    busy = ["mal1@example.com", "mal2@example.com", "mal3@example.com"]
    n = 0
    for step in range(30):  # 300 s of it
        advance_to(T0 + step * 10)
        for sender in busy:
            n += 1
            if judge(g, f"<{n}@m>", sender)[0] == "now":
                handed.append((clock.now, sender, f"<{n}@m>"))
    arrived = clock.now
    assert judge(g, "<alice@a>", ALICE)[0] == "defer"  # the domain's budget is used up
    assert g.counts()[0] > 40  # a long backlog waits ahead of it in arrival order
    advance_to(arrived + 30)
    alice = [t for t, s, _ in handed if s == ALICE]
    assert len(alice) == 1 and alice[0] - arrived <= 30
    # The domain cap still bounds the total in every window.
    for when, _, _ in handed:
        assert sum(1 for t, _, _ in handed if when - 30 < t <= when) <= 3
