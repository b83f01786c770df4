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
from tests.test_ratelimit import Clock

ALICE = "alice@example.com"


def message(n: int, sender: str) -> ChannelMessage:
    mid = f"<m{n}@example.com>"
    return ChannelMessage(id=mid, sender=sender, reply_target=sender, timestamp=0, thread_ts=mid)


def test_the_deferred_log_names_each_messages_own_release_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One per 30 s: the second waits 30 s, the third 60 s (not the scheduler's next
    wake-up, which is 30 s for both)."""
    clock = Clock()
    config = inbound_config(tmp_path, rate_limit_count=1, rate_limit_window_secs=30)
    deferred = DeferredMail(config, None, Metrics(), clock)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, "prx_channel_email.sync")
    verdicts = [deferred.judge(message(n, ALICE), MailKey("a", "INBOX", 1, n)) for n in range(3)]
    assert verdicts[0] is None
    logged = [r.getMessage() for r in caplog.records if "inbound.deferred" in r.getMessage()]
    assert len(logged) == 2
    assert "release_in=30s" in logged[0]
    assert "release_in=60s" in logged[1]
