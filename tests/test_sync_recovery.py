"""Recovery against the real Dovecot: restarts, kicks, silent drops, restarts of the bot,
UIDVALIDITY changes, and servers without IDLE."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes.pipeline import imap_config, mail, mid, running_engine
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.proxy import TcpProxy


@pytest.mark.parametrize("graceful", [True, False], ids=["bye", "crash"])
async def test_dovecot_restart_reconnects_and_delivers(
    dovecot: DovecotServer, account: Account, tmp_path: Path, graceful: bool
) -> None:
    config = imap_config(dovecot, account, tmp_path)
    async with running_engine(config) as run:
        await run.synced()
        await asyncio.to_thread(dovecot.stop, graceful=graceful)
        await run.wait_for(lambda: not run.engine.status.connected)
        await asyncio.to_thread(dovecot.start)
        await dovecot.adeliver(account, mail(1))
        assert (await run.next(timeout=20)).id == mid(1)
        assert run.metrics.get("imap.reconnects.network") >= 1
        assert run.metrics.get("imap.connects") >= 2
        assert not run.engine.status.auth_failed


async def test_kick_mid_idle_reconnects_and_delivers_mail_from_the_outage(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path)
    async with running_engine(config) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(1))
        assert (await run.next()).id == mid(1)
        await run.wait_for(lambda: run.engine.status.idling)
        await asyncio.to_thread(dovecot.kick, account)
        await dovecot.adeliver(account, mail(2))  # while the engine is backing off
        assert (await run.next(timeout=20)).id == mid(2)
        assert run.metrics.get("imap.reconnects.network") == 1
        assert run.metrics.get("imap.connects") == 2
        assert run.queue.empty()


async def test_silent_drop_is_detected_within_keepalive_and_recovered(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    proxy: Callable[[str, int], TcpProxy],
) -> None:
    link = proxy(dovecot.host, dovecot.imaps_port)
    keepalive, probe = 1, 2
    config = imap_config(
        dovecot,
        account,
        tmp_path,
        host=link.host,
        port=link.port,
        keepalive_secs=keepalive,
        command_timeout_secs=probe,
        connect_timeout_secs=2,
    )
    async with running_engine(config) as run:
        await run.wait_for(lambda: run.engine.status.idling)
        await asyncio.to_thread(link.freeze)
        await dovecot.adeliver(account, mail(1))  # its push is held back by the dead link
        # Detection: one keepalive wait plus one unanswered probe (and scheduling slack).
        await run.wait_for(
            lambda: run.metrics.get("imap.reconnects.network") >= 1, timeout=keepalive + probe + 3
        )
        assert run.engine.status.last_error_code == "timeout"
        assert not run.engine.status.connected
        await asyncio.to_thread(link.thaw)
        assert (await run.next(timeout=20)).id == mid(1)


async def test_restarted_bot_gets_exactly_the_mail_that_came_while_it_was_down(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path)
    async with running_engine(config) as run:
        await run.synced()
        await dovecot.adeliver(account, mail(1))
        assert (await run.next()).id == mid(1)
    for n in (2, 3, 4):
        await dovecot.adeliver(account, mail(n))
    async with running_engine(config) as run:
        assert await run.take(3) == [mid(2), mid(3), mid(4)]
        await run.synced()
        assert run.queue.empty()
        await dovecot.adeliver(account, mail(5))
        assert (await run.next()).id == mid(5)


async def test_uidvalidity_change_replays_nothing(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    dovecot.create_folder(account, "Work")
    config = imap_config(dovecot, account, tmp_path, imap_folder="Work")
    async with running_engine(config) as run:
        await run.synced()
        for n in (1, 2):
            await dovecot.adeliver(account, mail(n), folder="Work")
        assert sorted(await run.take(2)) == [mid(1), mid(2)]
    old = dovecot.uidvalidity(account, "Work")
    assert dovecot.recreate_folder(account, "Work") != old
    # The old mail comes back under new UIDs (as after a server migration), plus one new.
    for n in (1, 2, 3):
        dovecot.append(account, "Work", mail(n))
    async with running_engine(config) as run:
        assert (await run.next()).id == mid(3)
        await run.synced()
        assert run.queue.empty()
        assert run.metrics.get("imap.uidvalidity_changes") == 1
        assert run.metrics.get("inbound.skipped.duplicate") == 2
        await dovecot.adeliver(account, mail(4), folder="Work")
        assert (await run.next()).id == mid(4)


async def test_server_without_idle_is_polled(
    dovecot_noidle: DovecotServer, noidle_account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot_noidle, noidle_account, tmp_path, poll_interval_secs=1)
    async with running_engine(config) as run:
        await run.synced()
        assert run.engine.status.mode == "poll"
        await dovecot_noidle.adeliver(noidle_account, mail(1))
        assert (await run.next()).id == mid(1)
        await dovecot_noidle.adeliver(noidle_account, mail(2))
        assert (await run.next()).id == mid(2)
        assert run.metrics.get("imap.idle_cycles") == 0
        assert run.metrics.get("imap.connects") == 1
