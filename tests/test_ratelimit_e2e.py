"""Rate limits and the loop guard end to end, against the real Dovecot (and aiosmtpd):
mail over a limit waits and arrives later, in order, across restarts; a loop that
rotates addresses inside an allowed domain is held to a handful of replies."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import email.utils
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from prx_channel_email._storage.sqlite.store import DB_NAME
from prx_channel_email.channel import EmailChannel
from prx_channel_email.models import ChannelMessage
from tests.outbound_helpers import dovecot_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import ReceivedMessage, SmtpServer
from tests.test_policy_e2e import e2e_config, letter, listening
from tests.test_ratelimit import default_limits

ANNA = "anna@example.org"


def handoff_times(state_dir: Path) -> list[float]:
    """When each message was handed on, as the ledger recorded it."""
    with contextlib.closing(sqlite3.connect(state_dir / DB_NAME)) as conn:
        rows = conn.execute(
            "SELECT COALESCE(handed_at, received_at) FROM ledger"
            " WHERE outcome='delivered' ORDER BY 1"
        ).fetchall()
    return [r[0] for r in rows]


async def test_a_burst_over_the_limit_arrives_later_in_order_across_restarts(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    policy = {"allowed_senders": ["@example.org"], "rate_limit_count": 3}
    burst = [letter(ANNA, text=f"receipt {i}") for i in range(8)]
    ids = [mid for mid, _ in burst]

    # Run 1 (an hour's window): three are handed on at once, five wait in the store.
    config = e2e_config(dovecot, account, tmp_path, rate_limit_window_secs=3600, **policy)
    async with listening(config) as run:
        for _, raw in burst:
            dovecot.deliver(account, raw, mail_from=ANNA)
        got = [(await run.next()).id for _ in range(3)]
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 5)
        assert got == ids[:3]
        assert stats()["inbound.deferred"] == 5
        assert "inbound.skipped.rate_limited" not in stats()
        assert run.queue.empty()

    # Run 2, same window: the limit holds across the restart (rebuilt from the ledger),
    # and the waiting mail is still there, counted.
    async with listening(config) as run:
        assert run.channel.stats()["inbound.waiting.deferred"] == 5
        due = run.channel.sync.deferred.gate.next_due()
        assert due is not None and due > time.time() + 3000
        assert run.queue.empty()

    # Run 3, a one-second window: the five arrive, in arrival order, once each.
    config = e2e_config(dovecot, account, tmp_path, rate_limit_window_secs=1, **policy)
    async with listening(config) as run:
        later = [await run.next() for _ in range(5)]
        assert [m.id for m in later] == ids[3:]
        assert [m.content for m in later] == [f"receipt {i}" for i in range(3, 8)]
        assert not any(m.redelivered for m in later)
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.waiting.deferred") == 0)
        assert stats()["inbound.released"] == 5
        assert run.queue.empty()
    # Never more than three within a window: the fourth after any one came a second later.
    times = handoff_times(tmp_path / "state")
    assert len(times) == 8
    assert all(later - first >= 1.0 for first, later in zip(times, times[3:], strict=False))


async def test_released_mail_is_in_flight_until_acknowledged(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """handoff="ack": a released message is handed on like fresh mail, in flight until
    acked, and comes again (redelivered) after a restart if it was not."""
    config = e2e_config(
        dovecot,
        account,
        tmp_path,
        allowed_senders=[ANNA],
        rate_limit_count=1,
        rate_limit_window_secs=1,
        handoff="ack",
    )
    (first, raw1), (second, raw2) = letter(ANNA), letter(ANNA)
    async with listening(config) as run:
        dovecot.deliver(account, raw1, mail_from=ANNA)
        dovecot.deliver(account, raw2, mail_from=ANNA)
        got = await run.next()
        assert got.id == first
        await run.channel.ack(got)
        released = await run.next()  # a second later, through the same hand-off
        assert (released.id, released.redelivered) == (second, False)
        assert run.channel.stats()["inbound.released"] == 1
    async with listening(config) as run:  # not acknowledged: it comes again
        again = await run.next()
        assert (again.id, again.redelivered) == (second, True)
        await run.channel.ack(again)
    async with listening(config) as run:  # acknowledged: nothing comes
        assert run.channel.stats().get("inbound.waiting.deferred", 0) == 0
        assert run.queue.empty()


async def test_a_batch_of_25_goes_at_once_under_the_defaults(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ANNA], **default_limits())
    assert config.rate_limit_count == 30
    batch = [letter(ANNA, text=f"receipt {i}") for i in range(25)]
    async with listening(config) as run:
        for _, raw in batch:
            dovecot.deliver(account, raw, mail_from=ANNA)
        got = [(await run.next()).id for _ in batch]
        assert got == [mid for mid, _ in batch]
        stats = run.channel.stats()
        assert stats.get("inbound.deferred", 0) == 0
        assert stats.get("inbound.waiting.deferred", 0) == 0


class RotatingResponder:
    """An auto-responder without RFC 3834 headers that answers every mail the bot
    sends, each time from a new address of its (allowed) domain, at once."""

    def __init__(self, dovecot: DovecotServer, account: Account) -> None:
        self.dovecot = dovecot
        self.account = account
        self.answers = 0

    def first(self) -> None:
        self._send("responder0@example.org", "Hello", in_reply_to=None)

    def __call__(self, reply: ReceivedMessage) -> None:  # the SMTP server's relay hook
        parsed = email.message_from_bytes(reply.raw, policy=email.policy.default)
        self.answers += 1
        sender = f"responder{self.answers}@example.org"
        self._send(sender, str(parsed["Subject"]), in_reply_to=str(parsed["Message-ID"]))

    def _send(self, sender: str, subject: str, in_reply_to: str | None) -> None:
        lines = [
            f"From: Responder <{sender}>",
            f"To: {self.account.address}",
            f"Subject: {subject}",
            f"Date: {email.utils.formatdate()}",
            f"Message-ID: {email.utils.make_msgid(domain='example.org')}",
        ]
        if in_reply_to:  # no References: every answer even starts a thread of its own
            lines.append(f"In-Reply-To: {in_reply_to}")
        lines += ["Content-Type: text/plain; charset=utf-8", "", "Thank you for your mail!", ""]
        self.dovecot.deliver(self.account, "\r\n".join(lines).encode(), mail_from=sender)


async def test_a_rotating_responder_is_held_to_a_handful_of_replies(
    dovecot: DovecotServer,
    account: Account,
    smtp_server: SmtpServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prx_channel_email")
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account, allowed_senders=["@example.org"]
    )
    responder = RotatingResponder(dovecot, account)
    smtp_server.relay_to(responder)
    channel = EmailChannel(config)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()

    async def agent() -> None:  # answers everything, as a naive agent would
        while True:
            msg = await queue.get()
            await channel.send(msg.reply("Thanks, noted."))

    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        answering = asyncio.create_task(agent())
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), 15)
            responder.first()
            metrics = channel.metrics

            def settled() -> bool:
                # Held, and nothing in flight: every handed-on mail answered, every
                # answer of the responder judged. From here nothing moves any more.
                handed, held = metrics.get("inbound.handed_on"), metrics.get("inbound.held")
                return (
                    held >= 1
                    and len(smtp_server.messages) == handed
                    and handed + held == responder.answers + 1
                )

            async def wait_settled() -> None:
                while not settled():
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(wait_settled(), 60)
        finally:
            for task in (listener, answering):
                task.cancel()
            await asyncio.gather(listener, answering, return_exceptions=True)
        # The first mail and three quick answers got replies; the fourth quick answer
        # (from yet another address) is held, not dropped.
        assert len(smtp_server.messages) == 1 + config.loop_max_quick_replies
        assert channel.stats()["inbound.waiting.held"] == 1
    assert any("inbound.loop_suspected" in r.getMessage() for r in caplog.records)
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / DB_NAME)) as conn:
        (held,) = conn.execute("SELECT COUNT(*) FROM deferred WHERE reason='loop_suspected'")
    assert held == (1,)
