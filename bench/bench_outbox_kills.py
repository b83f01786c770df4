"""Benchmark: how often a SIGKILL makes the outbox send an accepted reply twice.

A child process sends one reply every ``--interval`` seconds through the outbox
to a local aiosmtpd server (in this process); the parent SIGKILLs it at a random
moment, starts it again (the new run resends what the dead one left in flight),
and repeats. At the end a last run drains the outbox. The server counts copies
per Message-ID: every copy beyond the first is a duplicate at the SMTP level
(same Message-ID and bytes, so one message in the recipient's client, but a
second delivery all the same).

Two modes, side by side in one run:

- ``batched``: the "sent" mark waits up to 0.2 s for another write to carry it
  (the behaviour before issue 14);
- ``immediate``: the mark is committed as soon as the server accepted (now the
  only behaviour of the channel).

    python bench/bench_outbox_kills.py [--kills 40] [--interval 0.4]

Duplicates left in ``immediate`` mode come from the window that cannot be
closed: a kill after the server committed the message but before the client
read its 250 and committed the mark (one network round trip plus one fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

ANN = "ann@people.example"
LEASE_SECS = 0.5
MODES = {"batched": 0.2, "immediate": 0.0}
_MID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


class Copies:
    """The SMTP sink: counts the copies of each Message-ID it accepted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        found = _MID.search(envelope.content)
        with self.lock:
            self.counts[found.group(1).decode() if found else "?"] += 1
        return "250 OK"


def config_fields(state_dir: Path, port: int) -> dict[str, Any]:
    return {
        "imap_host": "127.0.0.1",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_security": "plain",
        "username": "bot",
        "password": "unused",  # the local sink offers no AUTH
        "from_address": "bot@example.test",
        "state_dir": str(state_dir),
    }


async def child(spec: dict[str, Any]) -> None:
    """One run: resend what a dead run left, then a reply every ``interval`` until killed."""
    from prx_channel_email._outbound.outbox import Outbox
    from prx_channel_email._storage.sqlite.store import StateStore
    from prx_channel_email._support.observability import Metrics
    from prx_channel_email.config import EmailConfig
    from prx_channel_email.models import SendMessage

    logging.disable(logging.WARNING)
    config = EmailConfig(**spec["config"])
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(
            config,
            store,
            Metrics(),
            lease_secs=LEASE_SECS,
            sent_mark_delay_secs=spec["delay"],
        )
        await outbox.start()
        if spec["drain"]:
            await asyncio.wait_for(outbox.wait_idle(), timeout=60)
            await outbox.close()
            return
        print("ready", flush=True)
        n = 0
        while True:
            n += 1
            await outbox.send(SendMessage(content=f"reply {n} at {time.time()}", recipient=ANN))
            await asyncio.sleep(spec["interval"])


def spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def campaign(
    mode: str, kills: int, interval: float, port: int, sink: Copies, tmp: Path
) -> dict[str, Any]:
    state = tmp / mode
    spec = {
        "config": config_fields(state, port),
        "delay": MODES[mode],
        "interval": interval,
        "drain": False,
    }
    rng = random.Random(14)
    for _ in range(kills):
        proc = spawn(spec)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(1.0, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(LEASE_SECS + 0.1)  # the last run's lease runs out
    drain = spawn({**spec, "drain": True})
    assert drain.wait(timeout=90) == 0
    with sqlite3.connect(state / "state.sqlite3") as conn:
        stored = dict(conn.execute("SELECT message_id, state FROM outbox").fetchall())
    with sink.lock:
        copies = {mid: sink.counts[mid] for mid in stored}
    lost = [mid for mid, n in copies.items() if n == 0]
    assert not lost, f"{mode}: {len(lost)} replies never reached the server"
    assert set(stored.values()) == {"sent"}, stored
    dupes = sum(n - 1 for n in copies.values())
    return {
        "mode": mode,
        "kills": kills,
        "replies": len(stored),
        "duplicates": dupes,
        "kills_with_dup": sum(1 for n in copies.values() if n > 1),
    }


def main(kills: int, interval: float) -> None:
    logging.disable(logging.WARNING)
    sink = Copies()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for mode in MODES:
                results.append(campaign(mode, kills, interval, port, sink, Path(tmp)))
    finally:
        controller.stop()
    print(f"SIGKILL campaign: {kills} kills per mode, one reply every {interval} s")
    for r in results:
        rate = r["duplicates"] / r["kills"]
        print(
            f"{r['mode']:>9}: {r['replies']:4d} replies, {r['duplicates']:3d} duplicate"
            f" copies = {rate:.3f} per kill (1 in {1 / rate if rate else float('inf'):.1f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(json.loads(args.child)))
    else:
        main(args.kills, args.interval)
