"""SIGKILL at random points while a backlog drains: nothing lost, nothing recorded comes twice."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
from collections.abc import Collection
from pathlib import Path

from prx_channel_email._storage.sqlite.store import DB_NAME
from prx_channel_email.config import EmailConfig
from tests.fakes.pipeline import imap_config, mail, mid
from tests.servers.dovecot import Account, DovecotServer

ROOT = Path(__file__).resolve().parent.parent


def ledger(config: EmailConfig) -> set[str]:
    with sqlite3.connect(config.state_dir / DB_NAME) as conn:
        rows = conn.execute("SELECT message_id FROM ledger WHERE account=?", (config.account,))
        return {r[0] for r in rows}


async def spawn_child(config: EmailConfig) -> asyncio.subprocess.Process:
    """Start the sync child (tests/fakes/sync_child.py); it prints what it hands on."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.sync_child",
        json.dumps({**json.loads(config.model_dump_json()), "password": config.imap_login[1]}),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def run_child(
    config: EmailConfig, *, kill_after: int | None, known: Collection[str] = ()
) -> list[str]:
    """Run the child; SIGKILL it after ``kill_after`` handed-on ids, or after a quiet sync.

    Ids in ``known`` (handed on by an earlier run) do not count towards ``kill_after``:
    a campaign that kills right after every redelivery would otherwise never get past it.
    """
    proc = await spawn_child(config)
    assert proc.stdout is not None
    got: list[str] = []
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stdout.readline()).decode().strip()
                if not line:
                    raise AssertionError(f"child exited early with {await proc.wait()}")
                if line == "SYNCED":
                    if kill_after is None:
                        break
                    continue
                got.append(line)
                fresh = [m for m in got if m not in known]
                if kill_after is not None and len(fresh) >= kill_after:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # What the child printed before it died was handed on too, read or not.
    rest = (await proc.stdout.read()).decode().split()
    got += [line for line in rest if line != "SYNCED"]
    return got


async def test_sigkill_while_draining_loses_nothing_and_repeats_nothing_recorded(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, fetch_batch_size=20)
    assert await run_child(config, kill_after=None) == []  # baseline on the empty mailbox
    total = 150
    for n in range(total):
        dovecot.deliver(account, mail(n))
    rng = random.Random(3)
    seen: list[str] = []
    recorded = ledger(config)
    for _ in range(5):
        remaining = total - len(set(seen))
        if not remaining:
            break  # a fast machine drained the backlog already
        # Killed after 1-40 new hand-offs, never waiting for more than can still come.
        kill_after = min(rng.randint(1, 40), remaining)
        got = await run_child(config, kill_after=kill_after, known=set(seen))
        again = set(got) & recorded
        assert not again, f"recorded messages handed on again: {sorted(again)}"
        seen += got
        recorded = ledger(config)
        assert recorded <= set(seen)
    seen += await run_child(config, kill_after=None)  # let the rest drain
    assert set(seen) == {mid(n) for n in range(total)}
    assert ledger(config) == {mid(n) for n in range(total)}


async def run_child_for(config: EmailConfig, seconds: float) -> list[str]:
    """Run the child; SIGKILL it ``seconds`` after its first hand-off (or first pass)."""
    proc = await spawn_child(config)
    assert proc.stdout is not None
    got: list[str] = []
    first = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        while line := (await proc.stdout.readline()).decode().strip():
            if line != "SYNCED":
                got.append(line)
            first.set()  # a first hand-off, or a pass that found nothing to hand on
        first.set()  # the child exited: nothing more will come

    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(first.wait(), 60)
        await asyncio.sleep(seconds)  # the kill point: how far the backlog got is random
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await reader
    return got


async def test_kill_campaign_in_queue_mode_repeats_at_most_one_message_per_kill(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """Issue 14: a kill during a backlog used to repeat up to a whole fetch batch."""
    config = imap_config(dovecot, account, tmp_path, fetch_batch_size=25, handoff="queue")
    assert await run_child(config, kill_after=None) == []  # baseline on the empty mailbox
    total = 400
    for n in range(total):
        dovecot.deliver(account, mail(n))
    rng = random.Random(14)
    seen: list[str] = []
    repeats: list[int] = []
    for round_ in range(12):
        remaining = total - len(set(seen))
        if not remaining:
            break  # a fast machine drained the backlog within the timed rounds
        if round_ % 2:
            # Killed after 1-30 new hand-offs, never waiting for more than can still come.
            kill_after = min(rng.randint(1, 30), remaining)
            got = await run_child(config, kill_after=kill_after, known=set(seen))
        else:
            got = await run_child_for(config, rng.uniform(0.0, 0.15))
        repeats.append(len(set(got) & set(seen)))
        assert len(got) == len(set(got)), "a message came twice within one run"
        seen += got
    seen += await run_child(config, kill_after=None)  # let the rest drain
    assert max(repeats) <= 1, f"repeats per kill: {repeats}"
    assert set(seen) == {mid(n) for n in range(total)}  # nothing lost
    assert ledger(config) == {mid(n) for n in range(total)}
