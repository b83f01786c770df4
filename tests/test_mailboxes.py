"""Several accounts and folders behind one channel, against one real Dovecot.

Each test names the promise a user would notice: mail of every mailbox arrives,
marked with its account and folder; replies leave from the account that got the
mail; one mailbox's trouble (a refused login, a missing folder, a server that
stops answering, a backlog) never holds up another's mail; logins are gated per
server. "Arrives within N s" is a bounded wait on the event, not a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import threading
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import (
    ChannelError,
    ChannelMessage,
    ChannelState,
    EmailChannel,
    EmailConfig,
    SendError,
    SendMessage,
)
from prx_channel_email._inbound.policy import in_rollout
from tests.config_builder import config_table
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.proxy import TcpProxy
from tests.servers.smtp import SmtpServer

GENEROUS = 60.0
ALICE = "alice@example.test"


def raw_mail(sender: str, to: str, subject: str, body: str = "hello") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content(body)
    return msg.as_bytes()


def account_config(
    tmp_path: Path,
    dovecot: DovecotServer,
    user: Account,
    smtp: SmtpServer,
    **overrides: Any,
) -> EmailConfig:
    table = config_table(
        tmp_path / "state",
        dovecot=dovecot,
        account=user,
        smtp=smtp,
        from_address=user.address,
        allowed_senders=["@example.test"],
    )
    table.update(overrides)
    return EmailConfig(**table)


@contextlib.asynccontextmanager
async def serving(
    accounts: dict[str, EmailConfig],
) -> AsyncIterator[tuple[EmailChannel, asyncio.Queue[ChannelMessage]]]:
    channel = EmailChannel(accounts)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            yield channel, queue
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelError):
                await listener


async def next_with(
    queue: asyncio.Queue[ChannelMessage], subject: str, within: float
) -> tuple[ChannelMessage, list[ChannelMessage]]:
    """The message with ``subject``, and every other message taken off the queue first."""
    before: list[ChannelMessage] = []
    async with asyncio.timeout(within):
        while True:
            msg = await queue.get()
            if msg.subject == subject:
                return msg, before
            before.append(msg)


async def collect(
    queue: asyncio.Queue[ChannelMessage], subjects: set[str], within: float = GENEROUS
) -> dict[str, ChannelMessage]:
    """The messages with these subjects, in whatever order they come (each once)."""
    got: dict[str, ChannelMessage] = {}
    async with asyncio.timeout(within):
        while not subjects <= got.keys():
            msg = await queue.get()
            assert msg.subject not in got, f"{msg.subject!r} handed on twice"
            got[msg.subject] = msg
    return got


async def until(predicate: Callable[[], bool], within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.02)


def db_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("prx-email-db"))


async def test_every_mailbox_hands_on_its_mail_marked_with_account_and_folder(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    support, billing = dovecot.add_user(), dovecot.add_user()
    dovecot.create_folder(support, "Escalations")
    accounts = {
        "support": account_config(
            tmp_path, dovecot, support, smtp_server, imap_folders=["INBOX", "Escalations"]
        ),
        "billing": account_config(tmp_path, dovecot, billing, smtp_server),
    }
    threads_before = db_threads()
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        assert db_threads() - threads_before == 1  # one state store for three mailboxes
        assert [(m.account, m.folder, m.state) for m in channel.mailboxes()] == [
            ("support", "INBOX", ChannelState.CONNECTED),
            ("support", "Escalations", ChannelState.CONNECTED),
            ("billing", "INBOX", ChannelState.CONNECTED),
        ]
        await dovecot.adeliver(support, raw_mail(ALICE, support.address, "to support"))
        await dovecot.adeliver(
            support, raw_mail(ALICE, support.address, "escalated"), "Escalations"
        )
        await dovecot.adeliver(billing, raw_mail(ALICE, billing.address, "to billing"))
        got = {}
        async with asyncio.timeout(GENEROUS):
            while len(got) < 3:
                msg = await queue.get()
                got[msg.subject] = (msg.account, msg.folder)
        assert got == {
            "to support": ("support", "INBOX"),
            "escalated": ("support", "Escalations"),
            "to billing": ("billing", "INBOX"),
        }
        assert await channel.health_check()
        assert await channel.health_check(account="billing")
        # Counted per mailbox (what /metrics labels by account and folder), and in total.
        per_mailbox = {(a, f): c.get("inbound.handed_on") for a, f, c in channel.counters() if f}
        assert per_mailbox == {
            ("support", "INBOX"): 1,
            ("support", "Escalations"): 1,
            ("billing", "INBOX"): 1,
        }
        assert channel.stats()["inbound.handed_on"] == 3


async def test_replies_leave_from_the_account_that_received_the_parent(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    support, billing = dovecot.add_user(), dovecot.add_user()
    accounts = {
        "support": account_config(tmp_path, dovecot, support, smtp_server),
        "billing": account_config(tmp_path, dovecot, billing, smtp_server),
    }
    bob = "bob@example.test"
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        await dovecot.adeliver(billing, raw_mail(ALICE, billing.address, "invoice?"))
        await dovecot.adeliver(support, raw_mail(bob, support.address, "broken"))
        invoice = (await collect(queue, {"invoice?", "broken"}))["invoice?"]
        sent_before = len(smtp_server.messages)

        await channel.send(invoice.reply("Here it is."))  # reply(): the parent's account
        # Only content and recipient (a framework that knows nothing of email): the
        # account that received the recipient's latest mail.
        await channel.send(SendMessage(content="Fixed.", recipient=bob))
        # Explicitly chosen.
        await channel.send(SendMessage(content="Hi", recipient=ALICE, account="support"))
        sent = (await smtp_server.await_messages(sent_before + 3, timeout=GENEROUS))[sent_before:]
        senders = {m.message()["Subject"]: (m.mail_from, m.message()["From"]) for m in sent}
        assert senders["Re: invoice?"] == (billing.address, billing.address)
        assert senders["Re: broken"] == (support.address, support.address)
        assert senders["PRX Message"] == (support.address, support.address)

        # Several accounts, no parent anywhere, no account named: refused, not guessed.
        with pytest.raises(SendError) as info:
            await channel.send(SendMessage(content="?", recipient="carol@example.test"))
        assert info.value.code == "account_required"
        with pytest.raises(SendError) as info:
            await channel.send(SendMessage(content="?", recipient=ALICE, account="nope"))
        assert info.value.code == "account_unknown"


async def test_a_refused_login_fails_its_account_while_the_others_serve(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    good, bad = dovecot.add_user(), dovecot.add_user()
    accounts = {
        "good": account_config(tmp_path, dovecot, good, smtp_server),
        "bad": account_config(tmp_path, dovecot, bad, smtp_server, password="wrong-password"),
    }
    async with serving(accounts) as (channel, queue):
        with pytest.raises(ChannelError) as info:
            await channel.wait_ready(GENEROUS)
        assert (info.value.code, info.value.account) == ("auth_failed", "bad")
        await channel.wait_ready(GENEROUS, account="good")
        await dovecot.adeliver(good, raw_mail(ALICE, good.address, "still served"))
        msg, _ = await next_with(queue, "still served", GENEROUS)
        assert msg.account == "good"
        states = {m.account: (m.state, m.code) for m in channel.mailboxes()}
        assert states == {
            "good": (ChannelState.CONNECTED, None),
            "bad": (ChannelState.FAILED, "auth_failed"),
        }
        assert await channel.health_check(account="good")
        assert not await channel.health_check(account="bad")
        assert not await channel.health_check()


async def test_a_missing_folder_fails_its_mailbox_only(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    user = dovecot.add_user()
    accounts = {
        "support": account_config(
            tmp_path, dovecot, user, smtp_server, imap_folders=["INBOX", "NoSuchFolder"]
        )
    }
    async with serving(accounts) as (channel, queue):
        with pytest.raises(ChannelError) as info:
            await channel.wait_ready(GENEROUS)
        assert (info.value.code, info.value.account) == ("folder_missing", "support")

        def inbox_connected() -> bool:  # the failure may come before INBOX is selected
            return any(m.folder == "INBOX" and m.state is ChannelState.CONNECTED
                       for m in channel.mailboxes())  # fmt: skip

        await until(inbox_connected)
        await dovecot.adeliver(user, raw_mail(ALICE, user.address, "inbox still works"))
        msg, _ = await next_with(queue, "inbox still works", GENEROUS)
        assert (msg.account, msg.folder) == ("support", "INBOX")
        states = {m.folder: (m.state, m.code) for m in channel.mailboxes()}
        assert states["NoSuchFolder"] == (ChannelState.FAILED, "folder_missing")
        assert states["INBOX"] == (ChannelState.CONNECTED, None)


async def test_a_server_that_stops_answering_does_not_delay_another_accounts_mail(
    dovecot: DovecotServer,
    smtp_server: SmtpServer,
    tmp_path: Path,
    proxy: Callable[[str, int], TcpProxy],
) -> None:
    """The stalled account's session hangs mid-IDLE (the proxy stops forwarding in both
    directions, the TCP connection stays up); the other account's mail arrives within 3 s."""
    stalled_user, live_user = dovecot.add_user(), dovecot.add_user()
    p = proxy(dovecot.host, dovecot.imaps_port)
    accounts = {
        "stalled": account_config(
            tmp_path,
            dovecot,
            stalled_user,
            smtp_server,
            imap_host="localhost",
            imap_port=p.address[1],
        ),
        "live": account_config(tmp_path, dovecot, live_user, smtp_server),
    }
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        await until(lambda: all(m.idling for m in channel.mailboxes()))
        p.freeze()
        # Mail for the stalled account: its push never gets through the frozen proxy.
        await dovecot.adeliver(stalled_user, raw_mail(ALICE, stalled_user.address, "stuck"))
        await dovecot.adeliver(live_user, raw_mail(ALICE, live_user.address, "live"))
        msg, before = await next_with(queue, "live", within=3.0)
        assert msg.account == "live" and before == []
        p.thaw()
        stuck, _ = await next_with(queue, "stuck", GENEROUS)  # and nothing was lost
        assert stuck.account == "stalled"


def _lmtp_many(dovecot: DovecotServer, user: Account, count: int) -> None:
    """``count`` mails to ``user`` over one LMTP session (fast enough for a backlog)."""
    with smtplib.LMTP(dovecot.host, dovecot.lmtp_port, local_hostname="localhost") as lmtp:
        for i in range(count):
            lmtp.sendmail(ALICE, [user.address], raw_mail(ALICE, user.address, f"backlog {i}"))


async def test_a_backlog_in_one_mailbox_does_not_delay_another_mailbox(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """400 unseen mails in one mailbox (handed on at the first start, initial_sync =
    "unseen"); another account's single mail arrives within 5 s all the same."""
    busy, quiet = dovecot.add_user(), dovecot.add_user()
    await asyncio.to_thread(_lmtp_many, dovecot, busy, 400)
    accounts = {
        "busy": account_config(
            tmp_path, dovecot, busy, smtp_server, initial_sync="unseen", fetch_batch_size=20
        ),
        "quiet": account_config(tmp_path, dovecot, quiet, smtp_server),
    }
    async with serving(accounts) as (channel, queue):
        first = await queue.get()  # the backlog is being drained
        assert first.account == "busy"
        await channel.wait_ready(GENEROUS, account="quiet")
        await dovecot.adeliver(quiet, raw_mail(ALICE, quiet.address, "not behind 400"))
        msg, before = await next_with(queue, "not behind 400", within=5.0)
        assert msg.account == "quiet"
        assert all(m.account == "busy" for m in before)
        # The backlog is not lost either: every one of the 400 comes.
        subjects = {first.subject, *(m.subject for m in before)}
        async with asyncio.timeout(GENEROUS * 2):
            while len(subjects) < 400:
                subjects.add((await queue.get()).subject)
        assert subjects == {f"backlog {i}" for i in range(400)}


async def test_logins_to_one_server_are_capped(
    dovecot: DovecotServer,
    smtp_server: SmtpServer,
    tmp_path: Path,
    proxy: Callable[[str, int], TcpProxy],
) -> None:
    """Six mailboxes, max_concurrent_logins = 2: while the server does not answer, two
    connections are open and four logins wait their turn; then all six come up. The
    same after an outage that drops every session at once."""
    p = proxy(dovecot.host, dovecot.imaps_port)
    users = [dovecot.add_user() for _ in range(3)]
    for user in users:
        dovecot.create_folder(user, "Other")
    accounts = {
        f"a{i}": account_config(
            tmp_path,
            dovecot,
            user,
            smtp_server,
            imap_host="localhost",
            imap_port=p.address[1],
            imap_folders=["INBOX", "Other"],
            max_concurrent_logins=2,
        )
        for i, user in enumerate(users)
    }
    p.freeze()
    async with serving(accounts) as (channel, _queue):
        await until(lambda: channel.logins.waiting == 4)
        assert p.connections_accepted <= 2
        p.thaw()
        await channel.wait_ready(GENEROUS)
        assert len(channel.mailboxes()) == 6

        # A server-wide outage: every session drops at once, and the server does not
        # answer when they come back. Again two logins at a time, the rest wait.
        await until(lambda: all(m.idling for m in channel.mailboxes()))
        before = p.connections_accepted
        p.freeze()
        p.cut()
        await until(lambda: channel.logins.waiting == 4)
        assert p.connections_accepted - before <= 2
        p.thaw()
        await until(lambda: all(m.state is ChannelState.CONNECTED for m in channel.mailboxes()))


async def test_capabilities_refuse_what_an_account_may_not_send(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    reader, replier, sender = dovecot.add_user(), dovecot.add_user(), dovecot.add_user()
    accounts = {
        "reader": account_config(tmp_path, dovecot, reader, smtp_server, capabilities=["receive"]),
        "replier": account_config(
            tmp_path, dovecot, replier, smtp_server, capabilities=["receive", "reply"]
        ),
        "sender": account_config(tmp_path, dovecot, sender, smtp_server, capabilities=["send"]),
    }
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        # A send-only account watches no folder.
        assert {m.account for m in channel.mailboxes()} == {"reader", "replier"}
        await dovecot.adeliver(reader, raw_mail(ALICE, reader.address, "read only"))
        await dovecot.adeliver(replier, raw_mail(ALICE, replier.address, "answer me"))
        got = await collect(queue, {"read only", "answer me"})
        read_only, answer_me = got["read only"], got["answer me"]
        sent_before = len(smtp_server.messages)

        with pytest.raises(SendError) as info:
            await channel.send(read_only.reply("no"))
        assert (info.value.code, info.value.account) == ("capability_disabled", "reader")
        await channel.send(answer_me.reply("yes"))
        with pytest.raises(SendError) as info:
            await channel.send(
                SendMessage(content="new", recipient="zed@example.test", account="replier")
            )
        assert (info.value.code, info.value.account) == ("capability_disabled", "replier")
        await channel.send(SendMessage(content="news", recipient=ALICE, account="sender"))
        sent = (await smtp_server.await_messages(sent_before + 2, timeout=GENEROUS))[sent_before:]
        assert sorted(m.mail_from for m in sent) == sorted([replier.address, sender.address])


def test_rollout_is_a_stable_share_of_senders() -> None:
    senders = [f"user{i}@example.test" for i in range(4000)]
    assert not any(in_rollout(s, 0) for s in senders)
    assert all(in_rollout(s, 100) for s in senders)
    ten = {s for s in senders if in_rollout(s, 10)}
    thirty = {s for s in senders if in_rollout(s, 30)}
    assert 300 <= len(ten) <= 500 and 1000 <= len(thirty) <= 1400
    assert ten <= thirty  # raising the share keeps everyone who was in
    assert in_rollout("User1@Example.test", 30) == in_rollout("user1@example.test", 30)


async def test_mail_outside_the_rollout_is_left_for_people(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    user = dovecot.add_user()
    senders = [f"person{i}@example.test" for i in range(200)]
    inside = next(s for s in senders if in_rollout(s, 20))
    outside = next(s for s in senders if not in_rollout(s, 20))
    accounts = {
        "support": account_config(
            tmp_path, dovecot, user, smtp_server, rollout_percent=20, mark_seen=True
        )
    }
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        await dovecot.adeliver(user, raw_mail(outside, user.address, "for a person"))
        await dovecot.adeliver(user, raw_mail(inside, user.address, "for the bot"))
        msg, before = await next_with(queue, "for the bot", GENEROUS)
        # In UID order: the earlier mail was decided, and not handed on.
        assert before == [] and msg.sender == inside
        assert channel.stats().get("inbound.rollout_skipped") == 1
        uids = dovecot.list_uids(user)
        assert "\\Seen" not in dovecot.flags(user, "INBOX", uids[0])  # untouched
        # The agent's mailbox tools show what the channel hands on: not the other mail.
        found = await channel.tools.search(account="support")
        assert [m["sender"] for m in found["messages"]] == [inside]


async def test_unacknowledged_mail_of_each_folder_comes_again_once_after_a_restart(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """handoff = "ack", one account with two folders: what was handed on and not
    acknowledged comes again after a restart, once, from its own folder."""
    user = dovecot.add_user()
    dovecot.create_folder(user, "Work")
    accounts = {
        "support": account_config(
            tmp_path, dovecot, user, smtp_server, imap_folders=["INBOX", "Work"], handoff="ack"
        )
    }
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        await dovecot.adeliver(user, raw_mail(ALICE, user.address, "in inbox"))
        await dovecot.adeliver(user, raw_mail(ALICE, user.address, "in work"), "Work")
        await collect(queue, {"in inbox", "in work"})  # neither acknowledged
    async with serving(accounts) as (channel, queue):
        await channel.wait_ready(GENEROUS)
        again = await collect(queue, {"in inbox", "in work"})
        assert {(m.folder, m.redelivered) for m in again.values()} == {
            ("INBOX", True),
            ("Work", True),
        }
        # A marker mail in each folder: once it is here, nothing else can be before it.
        await dovecot.adeliver(user, raw_mail(ALICE, user.address, "marker inbox"))
        await dovecot.adeliver(user, raw_mail(ALICE, user.address, "marker work"), "Work")
        rest = await collect(queue, {"marker inbox", "marker work"})
        assert set(rest) == {"marker inbox", "marker work"}  # no second redelivery
