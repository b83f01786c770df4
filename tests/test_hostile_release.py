"""Released mail under hostile conditions, against the real Dovecot: a release is
settled like any other hand-off, and the release re-checks who is allowed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import e2e_config, letter, listening

ANNA = "anna@example.org"


async def test_queue_mode_released_mail_is_not_repeated_after_a_clean_stop(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """handoff="queue": a message released from the rate limit is settled at the end of
    its release pass, so a clean stop repeats nothing (the README's promise)."""
    config = e2e_config(
        dovecot,
        account,
        tmp_path,
        allowed_senders=[ANNA],
        rate_limit_count=1,
        rate_limit_window_secs=1,
        handoff="queue",
    )
    (first, raw1), (second, raw2) = letter(ANNA), letter(ANNA)
    async with listening(config) as run:
        dovecot.deliver(account, raw1, mail_from=ANNA)
        dovecot.deliver(account, raw2, mail_from=ANNA)
        assert (await run.next()).id == first
        released = await run.next()  # a second later, from the release scheduler
        assert (released.id, released.redelivered) == (second, False)
        assert run.channel.stats()["inbound.released"] == 1
    async with listening(config) as run:  # a clean stop before: nothing comes again
        assert run.channel.stats().get("inbound.redelivered", 0) == 0
        assert run.queue.empty()


MALLORY = "mallory@example.org"


async def test_waiting_mail_of_a_sender_removed_at_runtime_is_refused_at_release(
    dovecot: DovecotServer, account: Account, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = e2e_config(
        dovecot,
        account,
        tmp_path,
        allowed_senders=[ANNA, MALLORY],
        rate_limit_count=1,
        rate_limit_window_secs=2,
    )
    (first, raw1), (_, raw2) = letter(MALLORY), letter(MALLORY)
    caplog.set_level(logging.INFO, "prx_channel_email")
    async with listening(config) as run:
        dovecot.deliver(account, raw1, mail_from=MALLORY)
        dovecot.deliver(account, raw2, mail_from=MALLORY)
        assert (await run.next()).id == first
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 1)
        await run.channel.remove_sender(MALLORY)
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 0)
        assert stats()["inbound.refused_at_release"] == 1
        assert stats().get("inbound.released", 0) == 0
        assert run.queue.empty()
        # Anna's mail goes on as before.
        anna, raw = letter(ANNA)
        dovecot.deliver(account, raw, mail_from=ANNA)
        assert (await run.next()).id == anna
    refused = [r.getMessage() for r in caplog.records if "refused_at_release" in r.getMessage()]
    assert len(refused) == 1 and MALLORY in refused[0] and "code=not_allowed" in refused[0]
    async with listening(config) as run:  # nothing of it comes after a restart either
        assert run.channel.stats().get("inbound.waiting.deferred", 0) == 0
        assert run.queue.empty()


async def test_waiting_mail_of_a_sender_gone_from_the_config_is_refused_after_a_restart(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    limits = {"rate_limit_count": 1}
    first, raw1 = letter(MALLORY)
    waiting = [letter(MALLORY) for _ in range(2)]
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA, MALLORY],
                        rate_limit_window_secs=3600, **limits)  # fmt: skip
    async with listening(config) as run:
        for raw in [raw1, *(r for _, r in waiting)]:
            dovecot.deliver(account, raw, mail_from=MALLORY)
        assert (await run.next()).id == first
        await run.until(lambda: run.channel.stats().get("inbound.waiting.deferred") == 2)
    # Restarted with mallory gone from the config and a window that lets all go now.
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA],
                        rate_limit_window_secs=1, **limits)  # fmt: skip
    async with listening(config) as run:
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 0)
        assert stats()["inbound.refused_at_release"] == 2
        assert run.queue.empty()


async def test_a_quiet_sender_goes_before_another_senders_backlog_of_its_domain(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """One mail per 2 s for the domain: mallory's backlog of three waits; anna's one
    mail, arriving after all of it, goes at the next free slot, not after the backlog."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=["@example.org"],
                        rate_limit_count=1, domain_rate_limit_count=1,
                        rate_limit_window_secs=2)  # fmt: skip
    backlog = [letter(MALLORY) for _ in range(4)]
    anna, raw_anna = letter(ANNA)
    async with listening(config) as run:
        for _, raw in backlog:
            dovecot.deliver(account, raw, mail_from=MALLORY)
        assert (await run.next()).id == backlog[0][0]
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 3)
        dovecot.deliver(account, raw_anna, mail_from=ANNA)
        later = [(await run.next()).id for _ in range(4)]
    assert sorted(later) == sorted([anna, *(mid for mid, _ in backlog[1:])])
    assert later.index(anna) <= 1, later  # one slot at most behind mallory
    assert [m for m in later if m != anna] == [mid for mid, _ in backlog[1:]]  # in order
