"""Push delivery over IDLE against the real Dovecot: on time, exactly once, across re-arms."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.fakes.pipeline import imap_config, mail, mid, running_engine
from tests.servers.dovecot import Account, DovecotServer


@pytest.mark.parametrize("pipeline", ["stub", "real"])
async def test_mail_delivered_while_listening_arrives(
    dovecot: DovecotServer, account: Account, tmp_path: Path, pipeline: str
) -> None:
    config = imap_config(dovecot, account, tmp_path)
    async with running_engine(config, pipeline=pipeline) as run:
        await run.synced()
        assert run.engine.status.mode == "idle"
        await dovecot.adeliver(account, mail(1))
        msg = await run.next()
        assert msg.id == mid(1)
        assert msg.sender == "alice@example.test"
        await run.wait_for(lambda: run.metrics.get("inbound.handed_on") == 1)
        # Fetching never marks the message read: the person still sees it as new.
        assert "\\Seen" not in dovecot.flags(account, "INBOX", dovecot.list_uids(account)[0])


async def test_random_arrivals_across_many_rearms_arrive_exactly_once(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, idle_timeout_secs=1, keepalive_secs=1)
    rng = random.Random(7)
    count = 12
    async with running_engine(config) as run:
        await run.synced()
        for n in range(count):
            await asyncio.sleep(rng.uniform(0.0, 0.7))  # random moments across the cycles
            await dovecot.adeliver(account, mail(n))
        ids = await run.take(count, timeout=30)
        assert sorted(ids) == sorted(mid(n) for n in range(count))
        # A few more cycles with nothing new must not hand anything on again.
        cycles = run.metrics.get("imap.idle_cycles")
        await run.wait_for(lambda: run.metrics.get("imap.idle_cycles") >= cycles + 2)
        assert run.queue.empty()
        assert run.metrics.get("imap.idle_cycles") >= 5
        assert run.metrics.get("imap.connects") == 1


async def test_first_start_new_ignores_existing_mail(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    dovecot.deliver(account, mail(1))
    config = imap_config(dovecot, account, tmp_path, initial_sync="new")
    async with running_engine(config) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(2))
        assert (await run.next()).id == mid(2)
        assert run.queue.empty()


async def test_first_start_unseen_hands_on_unread_mail(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    for n in range(3):
        dovecot.deliver(account, mail(n))
    dovecot.set_flags(account, "INBOX", dovecot.list_uids(account)[1], "\\Seen")
    config = imap_config(dovecot, account, tmp_path, initial_sync="unseen")
    async with running_engine(config) as run:
        assert sorted(await run.take(2)) == [mid(0), mid(2)]
        await run.synced()
        await dovecot.adeliver(account, mail(3))
        assert (await run.next()).id == mid(3)
        assert run.queue.empty()
