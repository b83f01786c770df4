"""Benchmark: a burst of replies through the outbox vs a bare aiosmtplib loop.

Both paths send to the same local aiosmtpd server (plaintext on loopback) in
the same run. The bare loop sends pre-composed messages on one connection; the
outbox path does everything a real reply does: ledger lookup, compose, durable
outbox row (fsync'd SQLite), SMTP on a reused connection, recording "sent"
(committed as soon as the server accepted). The outbox pays two fsyncs per reply
sent one by one (concurrent replies share them), so its rate depends on the
disk: the script prints the commit latency it measured. For comparison it also
runs the outbox with the "sent" marks batched on a 0.2 s timer (the behaviour
before issue 14, one fsync per reply, a wider crash window).

    python bench/bench_outbound.py [--count 1000] [--concurrency 16]

It reports the outbox two ways: replies sent one after another (each waits for
the previous), and a burst with several sends in flight, as a framework
answering several people at once does; concurrent replies share one SQLite
commit (group commit) while SMTP stays one transaction at a time on one
connection.

Target: the outbox path reaches at least 30% of the bare loop's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller

from prx_channel_email._outbound.compose import Parent, compose
from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage import HandoffBatch, LedgerEntry, MailKey, Record
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import SendMessage

ANN = "ann@people.example"


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.count += 1
        return "250 OK"


def make_config(state_dir: Path, port: int) -> EmailConfig:
    return EmailConfig(
        imap_host="127.0.0.1",
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_security="plain",
        username="bot",
        password="unused",  # the local sink offers no AUTH
        from_address="bot@example.test",
        state_dir=state_dir,
    )


async def bare_loop(config: EmailConfig, raws: list[bytes]) -> float:
    smtp = aiosmtplib.SMTP(hostname=config.smtp_host, port=config.smtp_port, start_tls=False)
    await smtp.connect()
    start = time.perf_counter()
    for raw in raws:
        await smtp.sendmail(config.from_address, [ANN], raw)
    elapsed = time.perf_counter() - start
    await smtp.quit()
    return elapsed


async def through_outbox(
    config: EmailConfig, count: int, concurrency: int = 1, mark_delay: float = 0.0
) -> float:
    async with StateStore(config.state_dir) as store:
        entry = LedgerEntry(
            message_id="<parent@people.example>",
            sender=ANN,
            reply_target=ANN,
            subject="Benchmark thread",
            thread_ts="<parent@people.example>",
            references=[],
            received_at=time.time(),
        )
        key = MailKey(config.account, "INBOX", 1, 1)
        record = Record(key, entry.message_id, "delivered", entry=entry)
        await store.commit_handoff(HandoffBatch(key.mailbox, records=[record]))
        outbox = Outbox(config, store, Metrics(), sent_mark_delay_secs=mark_delay)
        await outbox.start()
        try:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with gate:
                    await outbox.send(SendMessage(content=f"Reply **{i}**", recipient=ANN))

            start = time.perf_counter()
            if concurrency == 1:
                for i in range(count):
                    await outbox.send(SendMessage(content=f"Reply **{i}**", recipient=ANN))
            else:
                await asyncio.gather(*(one(i) for i in range(count)))
            elapsed = time.perf_counter() - start
        finally:
            await outbox.close()
    return elapsed


async def commit_latency_ms(state_dir: Path, n: int = 200) -> float:
    """What one durable SQLite commit costs on this disk right now (the outbox pays one)."""
    async with StateStore(state_dir / "probe") as store:
        await store.run(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS probe (x)"))
        start = time.perf_counter()
        for _ in range(n):
            await store.run(lambda conn: conn.execute("INSERT INTO probe VALUES (1)"))
        return (time.perf_counter() - start) / n * 1000


async def main(count: int, concurrency: int) -> None:
    logging.disable(logging.WARNING)
    handler = Counter()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = make_config(Path(tmp) / "state", port)
            parent = Parent("<parent@people.example>", "Benchmark thread", [])
            raws = [
                compose(config, content=f"Reply **{i}**", recipient=ANN, parent=parent).raw
                for i in range(count)
            ]
            before = await commit_latency_ms(Path(tmp))
            bare = await bare_loop(config, raws)
            outbox = await through_outbox(config, count)
            config = make_config(Path(tmp) / "state2", port)
            burst = await through_outbox(config, count, concurrency)
            # The same with "sent" marks batched on a 0.2 s timer (before issue 14).
            config = make_config(Path(tmp) / "state3", port)
            batched = await through_outbox(config, count, mark_delay=0.2)
            config = make_config(Path(tmp) / "state4", port)
            batched_burst = await through_outbox(config, count, concurrency, mark_delay=0.2)
            after = await commit_latency_ms(Path(tmp))
    finally:
        controller.stop()
    assert handler.count == 5 * count, handler.count
    bare_rate, outbox_rate, burst_rate = count / bare, count / outbox, count / burst
    print(f"messages:          {count} per run ({handler.count} accepted by the server)")
    print(f"bare aiosmtplib:   {bare_rate:8.1f} replies/s  ({bare:.2f} s, one connection)")
    print(
        f"outbox, one by one:{outbox_rate:8.1f} replies/s  ({outbox:.2f} s)"
        f"  = {outbox_rate / bare_rate:.0%} of bare"
    )
    print(
        f"outbox, {concurrency:2d} at once:{burst_rate:8.1f} replies/s  ({burst:.2f} s)"
        f"  = {burst_rate / bare_rate:.0%} of bare (target >= 30%)"
    )
    for label, took in (("one by one", batched), (f"{concurrency:2d} at once", batched_burst)):
        print(
            f"  batched marks, {label}: {count / took:8.1f} replies/s"
            f"  = {count / took / bare_rate:.0%} of bare (the 0.2 s timer, for comparison)"
        )
    print(
        f"durable commit:    {before:.2f} ms before, {after:.2f} ms after"
        " (one-by-one pays two per reply)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16, help="sends in flight for the burst")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency))
