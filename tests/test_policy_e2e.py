"""End to end against the real Dovecot: mail delivered by LMTP while an EmailChannel
listens. Rejected mail must never reach the queue, accepted mail must, and rejected
mail stays untouched on the server."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._mail.message_ids import mint_message_id
from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.fakes.pipeline import imap_config
from tests.servers.dovecot import Account, DovecotServer

_seq = iter(range(1_000_000))


def letter(
    sender: str, *extra: str, mid: str | None = None, text: str = "hello"
) -> tuple[str, bytes]:
    """A message and its Message-ID."""
    mid = mid or f"<e2e-{next(_seq)}@example.org>"
    lines = [
        f"From: {sender}",
        "To: bot@example.test",
        f"Subject: test {mid}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {mid}",
        *extra,
        "Content-Type: text/plain; charset=utf-8",
    ]
    return mid, ("\r\n".join(lines) + f"\r\n\r\n{text}\r\n").encode()


def e2e_config(dovecot: DovecotServer, account: Account, tmp_path: Path, **kw: Any) -> EmailConfig:
    """The transport tests' IMAP config, with this test's policy settings."""
    return imap_config(
        dovecot, account, tmp_path / "state", attachments_dir=tmp_path / "attachments", **kw
    )


@dataclass
class Listening:
    channel: EmailChannel
    queue: asyncio.Queue[ChannelMessage]

    async def next(self, timeout: float = 15.0) -> ChannelMessage:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def until(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def listening(config: EmailConfig) -> AsyncIterator[Listening]:
    channel = EmailChannel(config)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with channel:
        task = asyncio.create_task(channel.listen(queue))
        try:
            # Wait for the first sync pass, so mail delivered next is "new" mail.
            await asyncio.wait_for(channel.sync.synced.wait(), 15)
            yield Listening(channel, queue)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize(
    ("allowed", "accepted", "refused"),
    [
        (
            ["carol@example.org"],
            ["Carol <CAROL@Example.ORG>"],
            ["carl@example.org", "x@other.example"],
        ),
        (
            ["@example.org"],
            ["dave@example.org", "Eve@EXAMPLE.org"],
            ["dave@sub.example.org", "dave@example.org.evil.example"],
        ),
        (["*"], ["anyone@somewhere.example", "carol@example.org"], []),
        ([], [], ["carol@example.org", "anyone@somewhere.example"]),
    ],
    ids=["exact-address", "domain", "everyone", "no-one"],
)
async def test_allow_list_forms_end_to_end(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    allowed: list[str],
    accepted: list[str],
    refused: list[str],
) -> None:
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=allowed)
    async with listening(config) as run:
        refused_ids = []
        for sender in refused:
            mid, raw = letter(sender)
            refused_ids.append(mid)
            await dovecot.adeliver(account, raw)
        accepted_ids = []
        for sender in accepted:
            mid, raw = letter(sender)
            accepted_ids.append(mid)
            await dovecot.adeliver(account, raw)
        got = [(await run.next()).id for _ in accepted_ids]
        assert got == accepted_ids
        metrics = run.channel.metrics
        await run.until(lambda: metrics.get("inbound.skipped.not_allowed") == len(refused))
        assert run.queue.empty()
    # Refused mail is left alone on the server: still there, still unread.
    uids = dovecot.list_uids(account)
    assert len(uids) == len(accepted) + len(refused)
    for uid in uids:
        assert "\\Seen" not in dovecot.flags(account, "INBOX", uid)


async def test_loop_guards_end_to_end(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = e2e_config(
        dovecot,
        account,
        tmp_path,
        allowed_senders=["@example.org"],
        own_addresses=["alias@example.org"],
        rate_limit_count=2,
        rate_limit_window_secs=3600,
        trusted_authserv_ids=["mx.example.test"],
        sender_auth="enforce",
    )
    verified = "Authentication-Results: mx.example.test; dmarc=pass header.from=example.org"
    # (headers, sender, LMTP envelope sender, expected skip reason)
    cases: list[tuple[list[str], str, str, str]] = [
        (
            ["Auto-Submitted: auto-replied"],
            "carol@example.org",
            "carol@example.org",
            "auto_submitted",
        ),
        (["Precedence: bulk"], "carol@example.org", "carol@example.org", "precedence_bulk"),
        (["X-Autoreply: yes"], "carol@example.org", "carol@example.org", "auto_reply"),
        (["X-Auto-Response-Suppress: All"], "carol@example.org", "carol@example.org", "auto_reply"),
        (["List-Id: <team.example.org>"], "carol@example.org", "carol@example.org", "list_mail"),
        (
            ["List-Unsubscribe: <mailto:leave@example.org>"],
            "carol@example.org",
            "carol@example.org",
            "list_mail",
        ),
        ([], "carol@example.org", "", "bounce"),  # null reverse-path: Dovecot writes <>
        ([], "MAILER-DAEMON@example.org", "x@example.org", "bounce"),
        ([], "alias@example.org", "alias@example.org", "own_address"),
        ([], account.address, account.address, "own_address"),
        # Forged: the top field (from our "provider") says DMARC failed.
        (
            ["Authentication-Results: mx.example.test; dmarc=fail header.from=example.org"],
            "ceo@example.org",
            "x@evil.example",
            "unverified_sender",
        ),
    ]
    async with listening(config) as run:
        metrics = run.channel.metrics
        for headers, sender, envelope_from, _ in cases:
            _, raw = letter(sender, *headers)
            dovecot.deliver(account, raw, mail_from=envelope_from)
        _, raw = letter("carol@example.org", verified, mid=mint_message_id(account.address))
        dovecot.deliver(account, raw, mail_from="carol@example.org")
        # Rate limit: two from dave arrive, the third waits (deferred, never refused).
        dave = [letter("dave@example.org", verified) for _ in range(3)]
        for _, raw in dave:
            dovecot.deliver(account, raw, mail_from="dave@example.org")
        sentinel, raw = letter("carol@example.org", verified, text="the sentinel")
        await dovecot.adeliver(account, raw, mail_from="carol@example.org")

        got = [await run.next() for _ in range(3)]
        assert [m.id for m in got] == [dave[0][0], dave[1][0], sentinel]
        assert got[2].content == "the sentinel" and got[2].sender_verified is True
        expected: dict[str, int] = {}
        for *_, reason in cases:
            expected[reason] = expected.get(reason, 0) + 1
        expected["own_message_id"] = 1
        await run.until(lambda: metrics.get("inbound.waiting.deferred") == 1)
        skipped = {
            k.removeprefix("inbound.skipped."): v
            for k, v in metrics.snapshot().items()
            if k.startswith("inbound.skipped.")
        }
        assert skipped == expected
        assert metrics.get("inbound.delivered") == 4  # accepted by the policy
        assert metrics.get("inbound.handed_on") == 3
        assert metrics.get("inbound.deferred") == 1
        assert run.queue.empty()


async def test_default_config_refuses_a_forged_from_and_delivers_genuine_mail(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """Issue 11: under the package's defaults, no forged From reaches the agent."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=["@example.org"])
    fields = config.model_dump(exclude={"sender_auth"}, exclude_unset=True)
    default = EmailConfig(**fields)  # sender_auth left at the package default
    assert default.sender_auth == "enforce" and default.trusted_authserv_ids == []
    trusting = EmailConfig(**fields, trusted_authserv_ids=["mx.example.test"])
    genuine_header = "Authentication-Results: mx.example.test; dmarc=pass header.from=example.org"
    planted = "Authentication-Results: mx.example.test; dmarc=pass header.from=example.org"

    # Nothing trusted: every allowed sender's mail is refused, verified-looking or not.
    async with listening(default) as run:
        for extra in ([], [genuine_header]):
            _, raw = letter("ceo@example.org", *extra)
            await dovecot.adeliver(account, raw, mail_from="x@evil.example")
        metrics = run.channel.metrics
        await run.until(lambda: metrics.get("inbound.skipped.unverified_sender") == 2)
        assert run.queue.empty()

    # The provider's id trusted: forged mail is refused, genuine mail delivered.
    async with listening(trusting) as run:
        forged = [
            letter("ceo@example.org"),  # no Authentication-Results at all
            # A foreign top field over a planted "trusted" one.
            letter("ceo@example.org", "Authentication-Results: mx.other.example; none", planted),
        ]
        for _, raw in forged:
            await dovecot.adeliver(account, raw, mail_from="x@evil.example")
        mid, raw = letter("carol@example.org", genuine_header, text="the real one")
        await dovecot.adeliver(account, raw, mail_from="carol@example.org")
        got = await run.next()
        assert (got.id, got.sender_verified, got.content) == (mid, True, "the real one")
        metrics = run.channel.metrics
        await run.until(lambda: metrics.get("inbound.skipped.unverified_sender") == 2)
        assert run.queue.empty()
