"""Senders managed by the host: allow_sender / remove_sender persisted across a
restart, and on_rejected telling the host who was refused (real Dovecot)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import ChannelError, ChannelMessage, EmailChannel, RejectedMessage
from prx_channel_email.config import EmailConfig
from tests.fakes.pipeline import imap_config, mail, mid
from tests.servers.dovecot import Account, DovecotServer

ALICE = "alice@example.test"
EVE = "eve@evil.example"


def config(dovecot: DovecotServer, account: Account, tmp_path: Path, **kw: Any) -> EmailConfig:
    kw.setdefault("allowed_senders", [])
    return imap_config(dovecot, account, tmp_path / "state", sender_auth="off", **kw)


class Run:
    def __init__(self, channel: EmailChannel) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        self.rejected: asyncio.Queue[RejectedMessage] = asyncio.Queue()

    async def next(self) -> ChannelMessage:
        return await asyncio.wait_for(self.queue.get(), 15)

    async def next_rejected(self) -> RejectedMessage:
        return await asyncio.wait_for(self.rejected.get(), 15)


@contextlib.asynccontextmanager
async def listening(cfg: EmailConfig) -> AsyncIterator[Run]:
    holder: list[Run] = []

    async def on_rejected(event: RejectedMessage) -> None:  # async callbacks are awaited
        await holder[0].rejected.put(event)

    channel = EmailChannel(cfg, on_rejected=on_rejected)
    run = Run(channel)
    holder.append(run)
    async with channel:
        task = asyncio.create_task(channel.listen(run.queue))
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), 15)  # mail from now on is new
            yield run
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_on_rejected_sees_a_sender_not_allowed(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    async with listening(config(dovecot, account, tmp_path, allowed_senders=[ALICE])) as run:
        await dovecot.adeliver(account, mail(1, sender=EVE))
        await dovecot.adeliver(account, mail(2, sender=ALICE))
        event = await run.next_rejected()
        assert (event.id, event.sender, event.reason) == (mid(1), EVE, "not_allowed")
        assert event.subject == "message 1"
        assert (await run.next()).id == mid(2)
        assert run.rejected.empty()


async def test_allow_sender_survives_a_restart(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    cfg = config(dovecot, account, tmp_path)
    async with listening(cfg) as run:
        await dovecot.adeliver(account, mail(1, sender=ALICE))
        refused = await run.next_rejected()
        assert (refused.sender, refused.reason) == (ALICE, "not_allowed")
        # The host's pairing flow approves her: the change is on disk when this returns.
        await run.channel.allow_sender(refused.sender)
        assert run.channel.allowed_senders == [ALICE]
        await dovecot.adeliver(account, mail(2, sender=ALICE))
        assert (await run.next()).id == mid(2)
    # A new process: the same config (still an empty allow-list) and state dir.
    async with listening(cfg) as run:
        assert run.channel.allowed_senders == [ALICE]
        await dovecot.adeliver(account, mail(3, sender=ALICE))
        assert (await run.next()).id == mid(3)
        await run.channel.remove_sender(ALICE)
        await dovecot.adeliver(account, mail(4, sender=ALICE))
        assert (await run.next_rejected()).id == mid(4)
    async with EmailChannel(cfg) as channel:
        assert channel.allowed_senders == []


async def test_removing_a_config_entry_is_persisted_and_undone_by_allowing_it(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    cfg = config(dovecot, account, tmp_path, allowed_senders=["@example.test", "bob@x.example"])
    async with EmailChannel(cfg) as channel:
        await channel.remove_sender("@Example.TEST")  # stored as the config spells it
        await channel.allow_sender("carol@y.example")
        assert channel.allowed_senders == ["bob@x.example", "carol@y.example"]
    async with EmailChannel(cfg) as channel:
        assert channel.allowed_senders == ["bob@x.example", "carol@y.example"]
        await channel.allow_sender("@example.test")
        await channel.remove_sender("carol@y.example")
    async with EmailChannel(cfg) as channel:
        assert channel.allowed_senders == ["@example.test", "bob@x.example"]


@pytest.mark.parametrize("entry", ["not an address", "@", "alice@example.test\r\nBcc: x"])
async def test_a_bad_entry_is_refused(
    dovecot: DovecotServer, account: Account, tmp_path: Path, entry: str
) -> None:
    async with EmailChannel(config(dovecot, account, tmp_path)) as channel:
        with pytest.raises(ChannelError) as info:
            await channel.allow_sender(entry)
        assert info.value.code == "invalid_argument"
        assert channel.allowed_senders == []
