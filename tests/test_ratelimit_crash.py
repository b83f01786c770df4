"""SIGKILL at random points while deferred mail waits and is released: nothing is lost,
a kill repeats at most the one message being put, and the order per sender holds."""

from __future__ import annotations

import random
from pathlib import Path

from tests.fakes.pipeline import imap_config, mail, mid
from tests.servers.dovecot import Account, DovecotServer
from tests.test_sync_crash import run_child


async def test_sigkill_while_deferred_mail_is_released_loses_nothing(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(
        dovecot,
        account,
        tmp_path,
        rate_limit_count=2,
        rate_limit_window_secs=1,
    )  # the builder's hand-off mode is "queue"
    assert await run_child(config, kill_after=None) == []  # baseline on the empty mailbox
    total = 12
    for n in range(total):
        dovecot.deliver(account, mail(n))  # all from one sender: 2 per second
    rng = random.Random(11)
    expected = {mid(n) for n in range(total)}
    runs: list[list[str]] = []
    seen: set[str] = set()
    while seen != expected and len(runs) < 30:
        # Killed after 1-3 new hand-offs (a redelivered one does not count), never
        # waiting for more than can still come.
        kill_after = min(rng.randint(1, 3), len(expected - seen))
        runs.append(await run_child(config, kill_after=kill_after, known=seen))
        seen.update(runs[-1])
    handed = [m for run in runs for m in run]
    missing = expected - set(handed)
    assert not missing, (sorted(missing), len(runs), runs)
    # A kill repeats at most the message being put when it came.
    earlier: set[str] = set()
    for run in runs:
        assert len(set(run) & earlier) <= 1, (run, sorted(earlier))
        earlier.update(run)
    # First appearances keep the arrival order.
    first = list(dict.fromkeys(handed))
    assert first == [mid(n) for n in range(total)]
