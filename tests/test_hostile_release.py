"""Released mail under hostile conditions, against the real Dovecot: a release is
settled like any other hand-off, and the release re-checks who is allowed."""

from __future__ import annotations

import asyncio
import contextlib
import email
import functools
import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prx_channel_email._mail.message_ids import mint_message_id
from prx_channel_email.channel import EmailChannel
from prx_channel_email.cli import app
from prx_channel_email.models import ChannelMessage
from tests.outbound_helpers import dovecot_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer
from tests.test_policy_e2e import e2e_config, letter, listening
from tests.test_quarantine_release import cli_config

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


async def test_forged_quick_answers_hold_nobody_and_a_real_quick_answer_is_not_held(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """Mallory answers "bot replies" that were never sent (ids of the minted shape, with
    a fresh timestamp): they are no quick answers, so neither her mail nor anna's
    genuine quick answer to a real reply is held."""
    config = dovecot_config(tmp_path, smtp_server, dovecot, account,
                            allowed_senders=["@example.org"], loop_max_quick_replies=3)  # fmt: skip
    channel = EmailChannel(config)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()

    async def next_message() -> ChannelMessage:
        return await asyncio.wait_for(queue.get(), 15)

    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), 15)
            first, raw = letter(ANNA)
            dovecot.deliver(account, raw, mail_from=ANNA)
            await channel.send((await next_message()).reply("Noted."))
            reply_id = str(email.message_from_bytes(smtp_server.messages[-1].raw)["Message-ID"])
            forged = [letter(MALLORY, f"In-Reply-To: {mint_message_id(config.from_address)}")
                      for _ in range(5)]  # fmt: skip
            for _, raw in forged:
                dovecot.deliver(account, raw, mail_from=MALLORY)
            got = [(await next_message()).id for _ in forged]
            assert got == [mid for mid, _ in forged]  # none of them held
            answer, raw = letter(
                ANNA, f"In-Reply-To: {reply_id}", f"References: {first} {reply_id}"
            )
            dovecot.deliver(account, raw, mail_from=ANNA)  # seconds after the real reply
            assert (await next_message()).id == answer
            assert channel.stats().get("inbound.held", 0) == 0
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def test_quarantined_mail_is_listed_by_the_api_and_the_cli(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """An allowed sender's mail naming the bot in Reply-To is quarantined (a person
    could write so too): the host and the operator see whose it is, what and why."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA])
    held, raw = letter(ANNA, f"Reply-To: {account.address}")
    async with listening(config) as run:
        dovecot.deliver(account, raw, mail_from=ANNA)
        await run.until(lambda: run.channel.stats().get("inbound.quarantined") == 1)
        await run.until(lambda: not run.channel.sync.writer._pending)  # recorded
        listed = await run.channel.quarantined()
    assert [(q.message_id, q.sender, q.subject, q.reason) for q in listed] == [
        (held, ANNA, f"test {held}", "own_mail")
    ]
    assert run.queue.empty()
    path = cli_config(config, tmp_path / "prx.toml")
    cli = functools.partial(CliRunner().invoke, app)  # asyncio.run inside: off this loop
    done = await asyncio.to_thread(cli, ["quarantine", "list", "--json", "--config", str(path)])
    assert done.exit_code == 0, done.output
    (shown,) = json.loads(done.output)
    assert (shown["id"], shown["sender"], shown["reason"]) == (listed[0].id, ANNA, "own_mail")
    text = await asyncio.to_thread(cli, ["quarantine", "list", "--config", str(path)])
    assert listed[0].id in text.output and ANNA in text.output and "own_mail" in text.output
