"""Replicas sharing one PostgreSQL: real Dovecot, real PostgreSQL, two channels.

Each channel stands for a replica process (its own ``replica_id``, its own store on
the one database). What is checked is what a user of several replicas notices: every
mail is handed on by exactly one replica, the mailboxes are shared between them, and
when one stops the other serves its mailboxes, handing on again what the first had
handed on but not acknowledged (``redelivered=True``). Kills and freezes of whole
processes are the campaign's (bench/bench_replicas.py measures failover times).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from prx_channel_email import ChannelError, ChannelMessage, EmailChannel, EmailConfig
from prx_channel_email.status import ChannelState
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer
from tests.test_mailboxes import account_config, raw_mail, until

LEASE = 3.0
GENEROUS = 60.0


def _accounts(
    tmp_path: Path, dovecot: DovecotServer, users: list[Account], smtp: SmtpServer, **kw: Any
) -> dict[str, EmailConfig]:
    return {
        f"acct{i}": account_config(
            tmp_path,
            dovecot,
            u,
            smtp,
            imap_folders=["INBOX", "Other"],
            handoff="ack",
            lease_secs=LEASE,
            **kw,
        )
        for i, u in enumerate(users)
    }


@contextlib.asynccontextmanager
async def replica(
    accounts: dict[str, EmailConfig], name: str
) -> AsyncIterator[tuple[EmailChannel, asyncio.Queue[ChannelMessage], asyncio.Task[None]]]:
    configs = {k: v.model_copy(update={"replica_id": name}) for k, v in accounts.items()}
    channel = EmailChannel(configs)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            yield channel, queue, listener
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelError):
                await listener


def _served(channel: EmailChannel) -> set[tuple[str, str]]:
    return {(m.account, m.folder) for m in channel.mailboxes()
            if m.here and m.state is ChannelState.CONNECTED}  # fmt: skip


async def _drain(queues: dict[str, asyncio.Queue[ChannelMessage]], subjects: set[str]) -> dict:  # type: ignore[type-arg]
    """subject -> list of (replica, message) until every subject came once."""
    got: dict[str, list[tuple[str, ChannelMessage]]] = {}
    async with asyncio.timeout(GENEROUS):
        while not subjects <= got.keys():
            for name, q in queues.items():
                while not q.empty():
                    msg = q.get_nowait()
                    got.setdefault(msg.subject, []).append((name, msg))
            await asyncio.sleep(0.02)
    return got


async def test_two_replicas_share_the_mailboxes_and_hand_each_mail_on_once(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path, pg_url: str
) -> None:
    users = [dovecot.add_user(), dovecot.add_user()]
    for u in users:
        dovecot.create_folder(u, "Other")
    accounts = _accounts(tmp_path, dovecot, users, smtp_server, state_url=pg_url)
    boxes = {(a, f) for a in accounts for f in ("INBOX", "Other")}
    async with replica(accounts, "r1") as (one, q1, _), replica(accounts, "r2") as (two, q2, _):
        await until(lambda: _served(one) | _served(two) == boxes
                    and len(_served(one)) == len(_served(two)) == 2, GENEROUS)  # fmt: skip
        assert not _served(one) & _served(two)
        # Every replica lists every mailbox, and who serves it.
        assert {(m.account, m.folder) for m in one.mailboxes()} == boxes
        # ... as of its last lease round (within a third of a lease).
        await until(lambda: {m.replica for m in one.mailboxes()} == {"r1", "r2"}, LEASE)
        assert await one.health_check() and await two.health_check()
        subjects = set()
        for i, u in enumerate(users):
            for folder in ("INBOX", "Other"):
                subject = f"to {i}/{folder}"
                subjects.add(subject)
                dovecot.deliver(u, raw_mail("alice@example.test", u.address, subject),
                                folder=folder)  # fmt: skip
        got = await _drain({"r1": q1, "r2": q2}, subjects)
        for subject, copies in got.items():
            assert len(copies) == 1, f"{subject!r} handed on by {[n for n, _ in copies]}"
            name, msg = copies[0]
            serving = one if name == "r1" else two
            assert (msg.account, msg.folder) in _served(serving)


async def test_a_stopping_replica_hands_its_mailboxes_and_unacked_mail_to_the_other(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path, pg_url: str
) -> None:
    users = [dovecot.add_user(), dovecot.add_user()]
    for u in users:
        dovecot.create_folder(u, "Other")
    accounts = _accounts(tmp_path, dovecot, users, smtp_server, state_url=pg_url)
    boxes = {(a, f) for a in accounts for f in ("INBOX", "Other")}
    async with replica(accounts, "r2") as (two, q2, _):
        async with replica(accounts, "r1") as (one, q1, _listener1):
            await until(lambda: len(_served(one)) == 2 and len(_served(two)) == 2, GENEROUS)
            moved = _served(one)
            account, folder = sorted(moved)[0]
            user = users[int(account.removeprefix("acct"))]
            dovecot.deliver(user, raw_mail("alice@example.test", user.address, "unacked"),
                            folder=folder)  # fmt: skip
            async with asyncio.timeout(GENEROUS):
                first = await q1.get()
            assert first.subject == "unacked" and not first.redelivered
            # r1 stops without acknowledging it.
        # r2 takes r1's mailboxes over at once (a clean stop gives the leases back) ...
        await until(lambda: _served(two) == boxes, 2 * LEASE + GENEROUS / 2)
        # ... and hands the unacknowledged mail on again, marked as such.
        async with asyncio.timeout(GENEROUS):
            again = await q2.get()
        assert again.subject == "unacked" and again.redelivered and again.id == first.id
        await two.ack(again)
        dovecot.deliver(user, raw_mail("alice@example.test", user.address, "after"),
                        folder=folder)  # fmt: skip
        async with asyncio.timeout(GENEROUS):
            after = await q2.get()
        assert after.subject == "after" and not after.redelivered


async def test_metrics_and_status_name_the_replica_serving_each_mailbox(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path, pg_url: str
) -> None:
    import urllib.request

    from tests.servers.dovecot import free_ports

    users = [dovecot.add_user()]
    dovecot.create_folder(users[0], "Other")
    (port,) = free_ports(1)
    accounts = _accounts(tmp_path, dovecot, users, smtp_server, state_url=pg_url,
                         metrics_port=port)  # fmt: skip
    async with replica(accounts, "r-metrics") as (one, _q, _):
        await until(lambda: len(_served(one)) == 2, GENEROUS)
        await until(lambda: {m.replica for m in one.mailboxes()} == {"r-metrics"}, LEASE * 2)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return r.read().decode()

        text = await asyncio.to_thread(scrape)
        assert 'prx_email_mailbox_here{account="acct0",folder="INBOX"} 1.0' in text
        assert (
            'prx_email_mailbox_replica{account="acct0",folder="Other",replica="r-metrics"} 1.0'
            in text
        )
