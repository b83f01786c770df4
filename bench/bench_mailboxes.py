"""Benchmark: the cost of each mailbox when one process serves many.

One Dovecot (its process limits raised, high-performance login mode) and one SMTP
sink; then, for each size N (default 10, 100, 1000), a fresh child process that
serves N mailboxes, and beside it, in the same run, a bare aioimaplib IDLE client
(its own process) as the push-latency floor. Per size:

* time from start until every mailbox is idle (logged in, folder selected, in IDLE);
* RSS per mailbox above the child's base (everything imported, nothing started);
* threads and file descriptors of the child, and fds per mailbox;
* CPU seconds the child spends over 30 s of idle;
* push latency, LMTP delivery -> message on the queue, on sampled mailboxes,
  alternated with LMTP delivery -> EXISTS at the bare client, so both see the same
  server and the same machine load.

And a drain: a backlog of 5,000 messages spread over 100 mailboxes, against the
same backlog in one mailbox (msg/s, each in a fresh child).

    python bench/bench_mailboxes.py [--mailboxes 1000] [--sizes 10,100,1000]
        [--mode one|separate] [--samples 5] [--idle-secs 30] [--drain 5000]

``--mode one`` serves all mailboxes from ONE EmailChannel (one account per
mailbox, ``EmailChannel(accounts)``); ``--mode separate`` runs one EmailChannel
per mailbox in the one process (the baseline before several mailboxes per
channel existed). Needs root for ``fs.inotify.max_user_instances`` (Dovecot needs
one inotify instance per IDLE session; without enough it falls back to polling
and pushes come late).

Targets (2 cores): all 1,000 idle within 60 s; <= 0.3 MiB RSS per mailbox above
base; threads not growing with mailboxes; <= 3 fds per mailbox; <= 0.6 s CPU over
30 s idle for all 1,000; push latency within 0.2 s of the bare client's, no
sample over 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import smtplib
import ssl
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")
SENDER = "person@example.org"


# --------------------------------------------------------------------------- /proc


def proc_figures(pid: int | str = "self") -> dict[str, float]:
    """RSS (MiB), threads and open fds of a process, from /proc."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# --------------------------------------------------------------------------- children


def account_fields(template: dict[str, Any], user: str, password: str) -> dict[str, Any]:
    return {**template, "username": user, "password": password, "from_address": user}


async def enter_all(stack: contextlib.AsyncExitStack, channels: list[Any]) -> None:
    """Start every channel at once (one by one, 1,000 separate stores take minutes)."""
    await asyncio.gather(*(ch.start() for ch in channels))
    for ch in channels:
        stack.push_async_callback(ch.close)


def make_channels(spec: dict[str, Any], **extra: Any) -> list[Any]:
    """``one``: one channel, one account per mailbox; ``separate``: a channel each."""
    from prx_channel_email import EmailChannel, EmailConfig

    template, users, state = spec["template"], spec["users"], Path(spec["state"])
    if spec["mode"] == "one":
        accounts = {
            f"m{i}": EmailConfig(**account_fields(template, u, p), state_dir=state, **extra)
            for i, (u, p) in enumerate(users)
        }
        return [EmailChannel(accounts)]  # type: ignore[arg-type]
    return [
        EmailChannel(
            EmailConfig(**account_fields(template, u, p), state_dir=state / f"m{i}", **extra)
        )  # type: ignore[arg-type]
        for i, (u, p) in enumerate(users)
    ]


async def serve_child(spec: dict[str, Any]) -> None:
    """Serve ``spec['users']`` as mailboxes; report figures; hand every message's
    arrival time to the parent; run until stdin closes."""
    from prx_channel_email import ChannelMessage

    users = spec["users"]
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    # The base: the package imported, no mailbox yet (their settings count as theirs).
    emit(event="base", **proc_figures())
    channels = make_channels(spec)
    start = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        await enter_all(stack, channels)
        listeners = [asyncio.create_task(ch.listen(queue)) for ch in channels]

        def idle_count() -> int:
            return sum(b.idling for ch in channels for b in ch.mailboxes())

        expected = len(users)
        while (n := idle_count()) < expected:
            await asyncio.sleep(0.05)
            if time.perf_counter() - start > spec["ready_within"]:
                emit(event="not_idle", idle=n, of=expected)
                break
        emit(event="idle", secs=time.perf_counter() - start, **proc_figures())
        await asyncio.sleep(2.0)  # settle (TLS buffers, first keepalive timers)
        before, cpu0 = proc_figures(), time.process_time()
        await asyncio.sleep(spec["idle_secs"])
        emit(
            event="cpu",
            secs=time.process_time() - cpu0,
            window=spec["idle_secs"],
            still_idle=idle_count(),
            **before,
        )

        async def report() -> None:
            while True:
                msg = await queue.get()
                emit(event="msg", id=msg.id, t=time.time())

        reporter = asyncio.create_task(report())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        reporter.cancel()
        for task in listeners:
            task.cancel()


async def bare_child(spec: dict[str, Any]) -> None:
    """One bare aioimaplib client in IDLE: print the time of every EXISTS push."""
    import aioimaplib

    ctx = ssl.create_default_context(cafile=spec["template"]["ca_file"])
    user, password = spec["users"][0]
    client = aioimaplib.IMAP4_SSL("127.0.0.1", spec["template"]["imap_port"], ssl_context=ctx)
    await client.wait_hello_from_server()
    await client.login(user, password)
    await client.select("INBOX")
    emit(event="idle", **proc_figures())

    async def loop() -> None:
        while True:
            idle = await client.idle_start(timeout=1500)
            while client.has_pending_idle():
                lines = await client.wait_server_push()
                if isinstance(lines, list) and any("EXISTS" in str(x) for x in lines):
                    emit(event="push", t=time.time())
                    client.idle_done()
                    break
            await asyncio.wait_for(idle, 10)

    task = asyncio.create_task(loop())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    task.cancel()


async def drain_child(spec: dict[str, Any]) -> None:
    """Serve the backlog mailboxes from scratch (initial_sync unseen) until ``expected``
    messages are on the queue; report wall and CPU seconds."""
    from prx_channel_email import ChannelMessage

    channels = make_channels(spec, initial_sync="unseen")
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        start, cpu = time.perf_counter(), time.process_time()
        await enter_all(stack, channels)
        listeners = [asyncio.create_task(ch.listen(queue)) for ch in channels]
        got, peak = 0, proc_figures()["rss"]
        while got < spec["expected"]:
            await asyncio.wait_for(queue.get(), 600)
            got += 1
            if got % 500 == 0:
                peak = max(peak, proc_figures()["rss"])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        for task in listeners:
            task.cancel()
    emit(event="drained", secs=elapsed, cpu=cpu, count=got, peak_rss=peak)


# --------------------------------------------------------------------------- parent


def raise_inotify(wanted: int) -> str:
    try:
        current = int(INOTIFY.read_text())
    except OSError:
        return "unknown"
    if current >= wanted:
        return f"{current}"
    try:
        INOTIFY.write_text(str(wanted))
    except OSError as exc:
        print(f"WARNING: cannot raise {INOTIFY} ({exc}); Dovecot may poll", file=sys.stderr)
        return f"{current} (could not raise)"
    return f"{current} -> {wanted}"


def dovecot_extra(n: int) -> str:
    """Room for ``n`` IDLE sessions: one imap process each, TLS terminated by a few
    long-lived login processes (Dovecot's high-performance mode)."""
    return f"""
default_process_limit = {n + 200}
default_client_limit = {4 * n + 1000}
service imap-login {{
  service_count = 0
  process_min_avail = 2
  client_limit = {2 * n + 200}
  vsz_limit = 1G
}}
service imap {{
  process_limit = {n + 200}
}}
"""


def message(n: int, rng: random.Random, kind: str = "plain") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Person <{SENDER}>"
    msg["To"] = "bot@example.test"
    msg["Subject"] = f"{kind} {n}"
    msg["Message-ID"] = f"<{kind}-{n}-{rng.getrandbits(40)}@example.org>"
    msg["Date"] = formatdate()
    msg.set_content(("lorem ipsum dolor sit amet " * 80 + "\n") * 2)
    return msg.as_bytes()


def lmtp_fill(server: Any, rcpts: list[str], count: int, rng: random.Random) -> None:
    """``count`` messages spread round-robin over ``rcpts``, one LMTP session."""
    with smtplib.LMTP(server.host, server.lmtp_port, local_hostname="localhost") as lmtp:
        for i in range(count):
            lmtp.sendmail(SENDER, [rcpts[i % len(rcpts)]], message(i, rng, "backlog"))


class Child:
    """A child process speaking JSON lines on stdout; closing stdin ends it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, mode: str, spec: dict[str, Any]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--child",
            mode,
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        return cls(proc)

    async def next(self, event: str, timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"child {self.pid} ended before {event!r}")
            data = json.loads(line)
            if data["event"] in (event, "not_idle"):
                if data["event"] == "not_idle":
                    print(f"WARNING: {data}", file=sys.stderr)
                    continue
                return data

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def latency(
    server: Any, subject: Child, bare: Child, bare_user: str, sampled: list[str], rounds: int
) -> tuple[list[float], list[float]]:
    """Alternate: a delivery to the bare client's mailbox, then one to a sampled
    mailbox of the subject; each timed from the LMTP call to its arrival."""
    rng = random.Random(7)
    ours: list[float] = []
    floor: list[float] = []
    for r in range(rounds):
        for rcpt in sampled:
            await asyncio.sleep(0.3)  # everyone back in IDLE
            t0 = time.time()
            await asyncio.to_thread(server.deliver, bare_user, message(r, rng, "floor"))
            floor.append((await bare.next("push", 30))["t"] - t0)
            await asyncio.sleep(0.3)
            t0 = time.time()
            await asyncio.to_thread(server.deliver, rcpt, message(r, rng, "sample"))
            ours.append((await subject.next("msg", 30))["t"] - t0)
    return ours, floor


def template_for(server: Any, smtp: Any) -> dict[str, Any]:
    return {
        "imap_host": "127.0.0.1",
        "imap_port": server.imaps_port,
        "imap_security": "tls",
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.tls_port,
        "smtp_security": "tls",
        "smtp_username": smtp.username,
        "smtp_password": smtp.password,
        "ca_file": str(server.ca_file),
        "allowed_senders": ["*"],
        "sender_auth": "off",
        "rate_limit_count": 1_000_000,
        "domain_rate_limit_count": 1_000_000,
        "connect_timeout_secs": 60,
        "command_timeout_secs": 60,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=1000, help="the largest size")
    parser.add_argument("--sizes", default=None, help="comma-separated (default 10,100,N)")
    parser.add_argument("--mode", choices=("one", "separate"), default="one")
    parser.add_argument("--samples", type=int, default=5, help="sampled mailboxes per size")
    parser.add_argument("--rounds", type=int, default=2, help="deliveries per sampled mailbox")
    parser.add_argument("--idle-secs", type=float, default=30.0)
    parser.add_argument("--drain", type=int, default=5000, help="backlog size (0: skip)")
    parser.add_argument("--drain-mailboxes", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or f"10,100,{args.mailboxes}").split(",")]
    top = max(sizes)

    from tests.servers.dovecot import DovecotServer
    from tests.servers.smtp import SmtpServer

    inotify = raise_inotify(max(8192, 4 * top))
    rows: list[tuple[str, str]] = [("mode", args.mode), ("inotify instances", inotify)]
    with (
        tempfile.TemporaryDirectory(prefix="prx-bench-mb-") as tmpdir,
        DovecotServer(
            extra_config=dovecot_extra(top + args.drain_mailboxes + 10), startup_timeout=60
        ) as server,
    ):
        tmp = Path(tmpdir)
        smtp = SmtpServer(server.pki)
        smtp.start()
        try:
            template = template_for(server, smtp)
            print(f"creating {top} users ...", file=sys.stderr)
            users = [server.add_user() for _ in range(top)]
            bare_user = server.add_user()
            creds = [(u.username, u.password) for u in users]
            results: dict[int, dict[str, Any]] = {}
            for n in sizes:
                print(f"{n} mailboxes ...", file=sys.stderr)
                spec = {
                    "template": template,
                    "users": creds[:n],
                    "mode": args.mode,
                    "state": str(tmp / f"s{n}"),
                    "idle_secs": args.idle_secs,
                    "ready_within": 600,
                }
                bare = await Child.start(
                    "bare",
                    {"template": template, "users": [(bare_user.username, bare_user.password)]},
                )
                await bare.next("idle", 60)
                subject = await Child.start("serve", spec)
                base = await subject.next("base")
                idle = await subject.next("idle", 900)
                cpu = await subject.next("cpu", 900)
                step = max(1, n // args.samples)
                sampled = [users[i].address for i in range(0, n, step)][: args.samples]
                ours, floor = await latency(
                    server, subject, bare, bare_user.address, sampled, args.rounds
                )
                await subject.stop()
                await bare.stop()
                results[n] = {"base": base, "idle": idle, "cpu": cpu, "ours": ours, "floor": floor}
                print(json.dumps({n: results[n]}), file=sys.stderr)

            for n, r in results.items():
                base, idle, cpu = r["base"], r["idle"], r["cpu"]
                ours, floor = r["ours"], r["floor"]
                rows.append((f"--- {n} mailboxes", ""))
                rows.append(("  time until all idle", f"{idle['secs']:.1f} s"))
                rows.append(("  RSS base -> idle", f"{base['rss']:.1f} -> {cpu['rss']:.1f} MiB"))
                rows.append(
                    ("  RSS per mailbox above base", f"{(cpu['rss'] - base['rss']) / n:.3f} MiB")
                )
                rows.append(
                    ("  threads (base -> idle)", f"{base['threads']:.0f} -> {cpu['threads']:.0f}")
                )
                rows.append(
                    (
                        "  fds (base -> idle), per mailbox",
                        f"{base['fds']:.0f} -> {cpu['fds']:.0f}, "
                        f"{(cpu['fds'] - base['fds']) / n:.2f}",
                    )
                )
                rows.append((f"  CPU over {cpu['window']:.0f} s idle", f"{cpu['secs']:.2f} s"))
                rows.append(
                    (
                        "  push latency, ours: median / max",
                        f"{statistics.median(ours):.3f} / {max(ours):.3f} s",
                    )
                )
                rows.append(
                    (
                        "  push latency, bare client: median / max",
                        f"{statistics.median(floor):.3f} / {max(floor):.3f} s",
                    )
                )
                rows.append(
                    (
                        "  ours - bare (medians)",
                        f"{statistics.median(ours) - statistics.median(floor):+.3f} s",
                    )
                )

            if args.drain:
                rows.extend(await drain(server, template, tmp, args))
        finally:
            smtp.stop()

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


async def drain(
    server: Any, template: dict[str, Any], tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    rng = random.Random(11)
    spread = [server.add_user() for _ in range(args.drain_mailboxes)]
    single = server.add_user()
    print(f"filling {args.drain} messages twice ...", file=sys.stderr)
    await asyncio.to_thread(lmtp_fill, server, [u.address for u in spread], args.drain, rng)
    await asyncio.to_thread(lmtp_fill, server, [single.address], args.drain, rng)
    rows: list[tuple[str, str]] = [(f"--- drain of {args.drain} messages", "")]
    rates: dict[str, list[float]] = {"spread": [], "single": []}
    per_cpu: dict[str, list[float]] = {"spread": [], "single": []}
    for run in range(2):  # alternated: machine noise hits both alike
        for name, accts in (("spread", spread), ("single", [single])):
            spec = {
                "template": template,
                "users": [(u.username, u.password) for u in accts],
                "mode": args.mode,
                "state": str(tmp / f"d-{name}-{run}"),
                "expected": args.drain,
            }
            child = await Child.start("drain", spec)
            out = await child.next("drained", 1800)
            await child.stop()
            rates[name].append(args.drain / out["secs"])
            per_cpu[name].append(args.drain / out["cpu"])
            print(json.dumps({name: out}), file=sys.stderr)
    for name, label in (
        ("spread", f"over {args.drain_mailboxes} mailboxes"),
        ("single", "in one mailbox"),
    ):
        rows.append(
            (
                f"  {label}, best of 2",
                f"{max(rates[name]):.0f} msg/s, {max(per_cpu[name]):.0f} msg/CPU-s",
            )
        )
    rows.append(("  ratio (spread / one)", f"{max(rates['spread']) / max(rates['single']):.2f}"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        kind, spec_json = sys.argv[2], json.loads(sys.argv[3])
        runner = {"serve": serve_child, "bare": bare_child, "drain": drain_child}[kind]
        asyncio.run(runner(spec_json))
    else:
        asyncio.run(main())
