"""Duplicates are mail already handed on: same Message-ID AND same sender (issue 15).

A stranger who sends a predictable Message-ID first must not make the real mail
with that id vanish; a real copy (same id, same sender) is still skipped, before
its body is parsed. Against the real Dovecot, through an EmailChannel.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import e2e_config, letter, listening

ALICE = "alice@example.org"
EVE = "eve@evil.test"


async def test_a_refused_mail_never_shadows_the_allowed_one_with_its_id(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ALICE])
    x = "<predictable-1@example.org>"
    async with listening(config) as run:
        _, forged = letter(f"Eve <{EVE}>", mid=x, text="pay me")
        await dovecot.adeliver(account, forged)
        run.channel.sync.synced.clear()
        await asyncio.wait_for(run.channel.sync.synced.wait(), 15)  # eve's was decided
        assert run.queue.empty()
        _, real = letter(f"Alice <{ALICE}>", mid=x, text="the real one")
        await dovecot.adeliver(account, real)
        got = await run.next()
        assert (got.id, got.sender, got.content) == (x, ALICE, "the real one")
        # A real copy (same id, same sender) is a duplicate, and so is eve's again.
        await dovecot.adeliver(account, real)
        await dovecot.adeliver(account, forged)
        _, later = letter(ALICE)
        await dovecot.adeliver(account, later)
        assert (await run.next()).sender == ALICE  # the later mail, nothing before it
        run.channel.sync.synced.clear()
        await asyncio.wait_for(run.channel.sync.synced.wait(), 15)
        assert run.queue.empty()
        assert run.channel.stats().get("inbound.skipped.duplicate") == 1
    # A reply to <X> threads onto alice's mail, not eve's.
    async with listening(config) as run:
        parent = await run.channel.store.find_message(config.account, x)
        assert parent is not None and parent.sender == ALICE


async def test_both_in_one_pass_the_allowed_one_still_comes(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ALICE])
    async with listening(config):
        pass  # the baseline: mail from now on
    x = "<predictable-2@example.org>"
    await dovecot.adeliver(account, letter(f"Eve <{EVE}>", mid=x)[1])
    await dovecot.adeliver(account, letter(f"Alice <{ALICE}>", mid=x, text="real")[1])
    async with listening(config) as run:
        got = await run.next()
        assert (got.id, got.sender) == (x, ALICE)
