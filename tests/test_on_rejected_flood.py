"""A flood of refused mail against a slow or blocking ``on_rejected`` (real Dovecot):
the host's callback runs one at a time from a bounded queue, overflow is counted and
logged once, and allowed mail keeps flowing (the event loop is never held)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import ChannelMessage, EmailChannel, RejectedMessage, status
from tests.fakes.pipeline import imap_config, mail, mid
from tests.servers.dovecot import Account, DovecotServer

ALICE = "alice@example.test"
EVE = "eve@evil.example"
FLOOD = 20


@contextlib.asynccontextmanager
async def listening(
    dovecot: DovecotServer, account: Account, tmp_path: Path, on_rejected: Any
) -> AsyncIterator[tuple[EmailChannel, asyncio.Queue[ChannelMessage]]]:
    cfg = imap_config(
        dovecot, account, tmp_path / "state", sender_auth="off", allowed_senders=[ALICE]
    )
    channel = EmailChannel(cfg, on_rejected=on_rejected)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with channel:
        task = asyncio.create_task(channel.listen(queue))
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), 15)
            yield channel, queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_waiting_async_callback_gets_one_event_at_a_time_and_overflow_is_counted(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refused mail used to start its own task: 20,000 refused mails against a
    callback that waits were 20,000 pending tasks (+201 MB)."""
    monkeypatch.setattr(status, "REJECTED_QUEUE_MAX", 5, raising=False)
    caplog.set_level(logging.WARNING, logger="prx_channel_email.status")
    started: list[str] = []
    release = asyncio.Event()

    async def on_rejected(event: RejectedMessage) -> None:
        started.append(event.id)
        await release.wait()  # the host is busy (asks a human, say)

    async with listening(dovecot, account, tmp_path, on_rejected) as (channel, queue):
        for n in range(FLOOD):
            await dovecot.adeliver(account, mail(n, sender=EVE))
        await dovecot.adeliver(account, mail(FLOOD, sender=ALICE))
        assert (await asyncio.wait_for(queue.get(), 30)).id == mid(FLOOD)
        assert started == [mid(0)]  # one callback in flight, not one per mail
        waiting = channel.reporter.rejected_waiting
        assert waiting <= 5  # bounded: the rest dropped and counted
        assert channel.metrics.get("on_rejected.dropped") == FLOOD - 1 - waiting
        overflow = [r for r in caplog.records if "on_rejected_overflow" in r.getMessage()]
        assert len(overflow) == 1  # logged once per overflow, not per mail
        release.set()  # the host catches up: the queued ones come, in order
        async with asyncio.timeout(15):
            while len(started) < 1 + waiting:
                await asyncio.sleep(0.02)
        numbers = [int(m.split("-")[1].split("@")[0]) for m in started]
        assert numbers == sorted(numbers) and len(started) == 1 + waiting


async def test_a_blocking_sync_callback_does_not_hold_the_event_loop(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """A plain function that blocks (a synchronous HTTP call, a lock) ran on the event
    loop and stalled it for every refused mail."""
    entered = threading.Event()
    release = threading.Event()
    calls: list[str] = []
    returned: list[str] = []

    def on_rejected(event: RejectedMessage) -> None:
        calls.append(event.id)
        entered.set()
        release.wait(20)
        returned.append(event.id)

    try:
        async with listening(dovecot, account, tmp_path, on_rejected) as (_, queue):
            for n in range(3):
                await dovecot.adeliver(account, mail(n, sender=EVE))
            assert await asyncio.to_thread(entered.wait, 30)
            await dovecot.adeliver(account, mail(3, sender=ALICE))
            assert (await asyncio.wait_for(queue.get(), 30)).id == mid(3)
            # Alice's mail came while the host's callback was still blocked.
            assert returned == [] and calls == [mid(0)]
            release.set()
            async with asyncio.timeout(30):
                while len(returned) < 3:
                    await asyncio.sleep(0.02)
            assert returned == [mid(0), mid(1), mid(2)]
    finally:
        release.set()
