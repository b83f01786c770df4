"""Benchmark: how many messages a SIGKILL during a backlog makes the inbound side repeat.

A child process (``tests/fakes/sync_child.py`` of the checkout under test) drains a
backlog from a real Dovecot and prints each message the moment it is put on the
queue; the parent SIGKILLs it at a random moment after its first hand-off, starts
it again, and counts per kill how many messages the next run hands on that an
earlier run had already put on the queue. A last run drains the rest; every
message must have arrived at least once.

    python bench/bench_inbound_kills.py [--kills 20] [--messages 600] [--handoff queue]
    python bench/bench_inbound_kills.py --checkout /path/to/older/checkout   # before

``--checkout`` runs the child of another checkout (e.g. the release before issue 14,
``git worktree add /tmp/old 73ffd4c``), with this checkout's Dovecot and driver;
``--handoff`` is left out of its config when it predates the field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.pipeline import mail  # noqa: E402
from tests.servers.certs import make_pki  # noqa: E402
from tests.servers.dovecot import Account, DovecotServer  # noqa: E402


def child_config(server: DovecotServer, account: Account, state: Path, handoff: str | None) -> str:
    fields = {
        "imap_host": "127.0.0.1",
        "imap_port": server.imaps_port,
        "smtp_host": "127.0.0.1",
        "username": account.username,
        "password": account.password,
        "from_address": account.address,
        "ca_file": str(server.ca_file),
        "state_dir": str(state),
        "allowed_senders": ["*"],
        "connect_timeout_secs": 5.0,
        "command_timeout_secs": 5.0,
        "keepalive_secs": 30,
        "poll_interval_secs": 1,
        "fetch_batch_size": 50,
        "sender_auth": "flag",
        "rate_limit_count": 1_000_000,
    }
    if handoff is not None:  # a checkout that predates these fields refuses them
        fields.update(handoff=handoff, domain_rate_limit_count=1_000_000)
    return json.dumps(fields)


async def run_child(checkout: Path, config: str, kill_in: float | None) -> list[str]:
    """Run the child; SIGKILL it ``kill_in`` s after its first hand-off (None: after a
    pass that found nothing more)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.sync_child", config,
        cwd=checkout, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )  # fmt: skip
    assert proc.stdout is not None
    got: list[str] = []
    first = asyncio.Event()
    quiet = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        while line := (await proc.stdout.readline()).decode().strip():
            if line == "SYNCED":
                first.set()
                quiet.set()
                continue
            got.append(line)
            first.set()
            quiet.clear()
        first.set()
        quiet.set()

    reader = asyncio.create_task(read())
    try:
        if kill_in is None:
            await asyncio.wait_for(quiet.wait(), 120)
        else:
            await asyncio.wait_for(first.wait(), 120)
            await asyncio.sleep(kill_in)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await reader
    return got


async def main(args: argparse.Namespace) -> None:
    checkout = Path(args.checkout).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        server = DovecotServer(idle=True, pki=make_pki(Path(tmp) / "pki"))
        server.start()
        try:
            account = server.add_user()
            handoff = None if args.handoff == "none" else args.handoff
            config = child_config(server, account, Path(tmp) / "state", handoff)
            await run_child(checkout, config, None)  # the baseline: an empty mailbox
            for n in range(args.messages):
                server.deliver(account, mail(n))
            rng = random.Random(args.seed)
            seen: set[str] = set()
            repeats: list[int] = []
            for _ in range(args.kills):
                got = await run_child(checkout, config, rng.uniform(0.0, args.max_delay))
                repeats.append(len(set(got) & seen))
                seen |= set(got)
            seen |= set(await run_child(checkout, config, None))
        finally:
            server.close()
    lost = args.messages - len(seen)
    print(f"checkout {checkout} handoff={args.handoff}")
    hit = sum(1 for r in repeats if r)
    print(f"kills {len(repeats)}: repeated per kill max {max(repeats)}, "
          f"mean {statistics.mean(repeats):.2f}, kills with repeats {hit}; "
          f"total repeated {sum(repeats)}; lost {lost}")  # fmt: skip
    print("repeats per kill:", repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--max-delay", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--handoff", default="queue", help='"none": a checkout before the field')
    parser.add_argument("--checkout", default=str(ROOT))
    asyncio.run(main(parser.parse_args()))
