"""Acknowledged hand-off (handoff="ack"): at least once to the host, exactly once once
acknowledged. A host process takes messages, acks some, replies to some (a durable
reply acks its parent), and is SIGKILLed at random points; each new channel hands on
again exactly the messages not acknowledged, flagged ``redelivered``."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.outbound_helpers import dovecot_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer

ROOT = Path(__file__).resolve().parent.parent


def letter(n: int) -> bytes:
    return (
        f"From: Carol <carol@example.org>\r\nTo: bot@example.test\r\nSubject: number {n}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <host-{n}@example.org>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nHello number {n}.\r\n"
    ).encode()


@dataclass
class Run:
    got: list[tuple[str, bool]] = field(default_factory=list)  # (id, redelivered)
    started: set[str] = field(default_factory=set)  # ack or reply begun
    confirmed: set[str] = field(default_factory=set)  # ack or reply returned


def child_config(config: EmailConfig) -> str:
    fields = json.loads(config.model_dump_json())
    fields["password"] = config.imap_login[1]
    if config.smtp_password is not None:
        fields["smtp_password"] = config.smtp_password.get_secret_value()
    return json.dumps(fields)


async def run_host(config: EmailConfig, *, kill_after: int | None, delay: float = 0.0) -> Run:
    """Run the host; SIGKILL it ``delay`` s after its ``kill_after``-th message, or
    (kill_after None) collect what a fresh channel hands on and stop."""
    mode = "collect" if kill_after is None else "work"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.host_child", child_config(config), mode,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    run = Run()
    enough = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        while line := (await proc.stdout.readline()).decode().strip():
            word, mid, *rest = [*line.split(" "), ""][:3]
            if word == "GOT":
                run.got.append((mid, rest[0] == "1"))
                if kill_after is not None and len(run.got) >= kill_after:
                    enough.set()
            elif word in ("ACKING", "REPLYING"):
                run.started.add(mid)
            elif word in ("ACKED", "REPLIED"):
                run.confirmed.add(mid)
            elif word == "DONE":
                enough.set()
        enough.set()

    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(enough.wait(), 60)
        await asyncio.sleep(delay)  # a random kill point within the host's work
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await reader
    return run


async def test_a_killed_host_gets_exactly_the_unacknowledged_messages_again(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account,
        handoff="ack", allowed_senders=["*"], initial_sync="unseen",
    )  # fmt: skip
    total = 36
    for n in range(total):
        dovecot.deliver(account, letter(n))
    rng = random.Random(10)
    handed: set[str] = set()  # handed on to some run so far
    confirmed: set[str] = set()  # acked, or replied to, and the call returned
    started: set[str] = set()
    for _ in range(5):
        run = await run_host(config, kill_after=rng.randint(1, 12), delay=rng.uniform(0, 0.2))
        ids = [mid for mid, _ in run.got]
        assert len(ids) == len(set(ids)), "handed on twice within one run"
        for mid, redelivered in run.got:
            assert mid not in confirmed, f"{mid} came again after it was acknowledged"
            # Seen by an earlier host: flagged. (One the killed run had put on the queue
            # but its host never took is flagged too: the channel cannot tell.)
            assert redelivered or mid not in handed, (mid, redelivered)
        handed |= set(ids)
        confirmed |= run.confirmed
        started |= run.started
    final = await run_host(config, kill_after=None)
    again = {mid for mid, redelivered in final.got if redelivered}
    fresh = {mid for mid, redelivered in final.got if not redelivered}
    # Exactly the others: everything handed on and not acknowledged (an ack the kill
    # interrupted may have reached the disk or not), and nothing acknowledged.
    assert handed - started <= again
    assert not again & confirmed
    assert not fresh & handed
    got = handed | again | fresh
    assert got == {f"<host-{n}@example.org>" for n in range(total)}  # none lost
    assert confirmed, "the campaign acknowledged nothing: it tested nothing"
    assert handed - started, "every message was acknowledged: it tested nothing"


async def test_mark_seen_waits_for_the_ack_and_a_redelivery_keeps_the_message(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """With handoff="ack", \\Seen (and a move) apply to acknowledged mail only, at
    the end of the next pass; an unacknowledged message stays as it was and comes
    again (flagged) after a restart, even though the cursor has moved past it."""
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account,
        handoff="ack", allowed_senders=["*"], mark_seen=True,
    )  # fmt: skip

    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        task = asyncio.create_task(channel.listen(queue))
        await asyncio.wait_for(channel.sync.synced.wait(), 15)
        await dovecot.adeliver(account, letter(100))
        await dovecot.adeliver(account, letter(101))
        first = await asyncio.wait_for(queue.get(), 15)
        second = await asyncio.wait_for(queue.get(), 15)
        assert (first.id, second.id) == ("<host-100@example.org>", "<host-101@example.org>")
        assert not first.redelivered and not second.redelivered
        await channel.ack(first)
        channel.sync.synced.clear()
        await dovecot.adeliver(account, letter(102))  # wakes the next pass
        third = await asyncio.wait_for(queue.get(), 15)
        await asyncio.wait_for(channel.sync.synced.wait(), 15)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    uids = dovecot.list_uids(account)
    assert dovecot.flags(account, "INBOX", uids[0]) == {"\\Seen"}  # acked
    assert dovecot.flags(account, "INBOX", uids[1]) == set()  # in flight: untouched
    assert third.id == "<host-102@example.org>"
    queue = asyncio.Queue()
    async with EmailChannel(config) as channel:
        task = asyncio.create_task(channel.listen(queue))
        await asyncio.wait_for(channel.sync.synced.wait(), 15)
        again = [queue.get_nowait() for _ in range(queue.qsize())]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(m.id, m.redelivered) for m in again] == [
        ("<host-101@example.org>", True),
        ("<host-102@example.org>", True),
    ]
