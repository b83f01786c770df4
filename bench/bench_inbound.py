"""Benchmark: inbound transport against a real Dovecot (started like the test fixture).

Measures, in one run:

* latency, server push -> message on the queue (the EXISTS line arriving at our
  socket to ``queue.put``), and LMTP delivery -> queue (includes Dovecot's own
  IDLE notification delay of about 0.5 s), median and p99, for 5 KB messages;
* backlog drain rate of the sync engine (real inbound pipeline, fsync'd ledger)
  vs two bare ``imaplib`` loops over the same mailbox, side by side: one that
  only parses (``email.message_from_bytes``, compat32), and the issue-13 baseline
  that reads each message the way a plain script would
  (``message_from_bytes(policy=email.policy.default)`` +
  ``get_body(('plain', 'html')).get_content()``);
* RSS: idle, peak during the drain, and the peak with a 50 MB message added.

    python bench/bench_inbound.py [--count 5000] [--latency 40]

Targets: push->queue median <= 20 ms; full-pipeline drain >= 1.3x the
policy=default baseline; idle RSS <= 60 MB; peak RSS <= 150 MB; a 50 MB message
raises the peak by <= 10 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import email.utils
import imaplib
import json
import logging
import random
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email._inbound.pipeline import InboundPipeline, Outcome  # noqa: E402
from prx_channel_email._inbound.sync import SyncEngine  # noqa: E402
from prx_channel_email._net.imap import ImapSession, open_session  # noqa: E402
from prx_channel_email._storage.sqlite.store import LedgerEntry, StateStore  # noqa: E402
from prx_channel_email._support.backoff import Backoff  # noqa: E402
from prx_channel_email._support.observability import Metrics  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402
from prx_channel_email.models import ChannelMessage  # noqa: E402
from tests.servers.dovecot import Account, DovecotServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from idle_rss import rss_mb  # noqa: E402

SENDERS = [f"person{i}@example.org" for i in range(50)]


@contextlib.contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Sample RSS every 10 ms in a thread; yields a one-element list holding the peak."""
    peak = [rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_mb())


def make_message(n: int, kind: str, rng: random.Random) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Person <{SENDERS[n % len(SENDERS)]}>"
    msg["To"] = "bot@example.test"
    msg["Subject"] = f"bench {kind} {n}"
    msg["Message-ID"] = f"<bench-{kind}-{n}-{rng.getrandbits(32)}@example.org>"
    msg["Date"] = email.utils.formatdate()
    words = [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
        "sed",
        "do",
    ]

    def text(size: int) -> str:
        out: list[str] = []
        length = 0
        while length < size:
            line = " ".join(rng.choice(words) for _ in range(12))
            out.append(line)
            length += len(line) + 1
        return "\n".join(out)

    if kind == "plain2k":
        msg.set_content(text(2000))
    elif kind == "multi20k":
        msg.set_content(text(9000))
        msg.add_alternative("<html><body><p>" + text(9000) + "</p></body></html>", subtype="html")
    elif kind == "latency5k":
        msg.set_content(text(5000))
    else:  # attach200k
        msg.set_content(text(1000))
        msg.add_attachment(
            rng.randbytes(200_000), maintype="application", subtype="pdf", filename="r.pdf"
        )
    return msg.as_bytes()


def backlog_kinds(count: int) -> list[str]:
    # 60 % plain 2 KB, 30 % multipart 20 KB, 10 % with a 200 KB attachment.
    return [("plain2k", "multi20k", "attach200k")[0 if i % 10 < 6 else 1 if i % 10 < 9 else 2]
            for i in range(count)]  # fmt: skip


def lmtp_fill(server: DovecotServer, account: Account, messages: list[bytes]) -> None:
    with smtplib.LMTP(server.host, server.lmtp_port, local_hostname="localhost") as lmtp:
        for raw in messages:
            lmtp.sendmail("sender@example.org", [account.address], raw)


def config_for(server: DovecotServer, account: Account, state: Path, **kw: Any) -> EmailConfig:
    fields: dict[str, Any] = {
        "imap_host": "127.0.0.1",
        "imap_port": server.imaps_port,
        "smtp_host": "127.0.0.1",
        "username": account.username,
        "password": account.password,
        "from_address": account.address,
        "ca_file": server.ca_file,
        "state_dir": state,
        "allowed_senders": ["*"],
        "sender_auth": "off",  # the backlog carries no Authentication-Results
        "rate_limit_count": 1_000_000,
    }
    fields.update(kw)
    return EmailConfig(**fields)


class BarePipeline(InboundPipeline):
    """The same work as the bare loop (``message_from_bytes``) plus a ChannelMessage.

    Drained with this, the ratio measures the transport (fetching, cursor and
    ledger writes, queue) rather than the policy/normalization pipeline.
    """

    async def process(
        self, raw: bytes, *, arrival: float | None = None, message_id: str | None = None
    ) -> Outcome:
        msg = email.message_from_bytes(raw)
        mid = str(msg["Message-ID"])
        sender = email.utils.parseaddr(str(msg["From"]))[1].lower()
        cm = ChannelMessage(id=mid, sender=sender, reply_target=sender,
                            subject=str(msg["Subject"]), timestamp=int(time.time()),
                            thread_ts=mid)  # fmt: skip
        entry = LedgerEntry(mid, sender, sender, cm.subject, mid, [], time.time())
        return Outcome("deliver", mid, message=cm, entry=entry)


class TimedQueue(asyncio.Queue[ChannelMessage]):
    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, float] = {}

    def put_nowait(self, item: ChannelMessage) -> None:
        self.times[item.id] = time.perf_counter()
        super().put_nowait(item)


class PushClock(asyncio.Event):
    """Replaces the session's 'changed' event to timestamp each EXISTS push."""

    def __init__(self, stamps: list[float]) -> None:
        super().__init__()
        self.stamps = stamps

    def set(self) -> None:
        self.stamps.append(time.perf_counter())
        super().set()


async def start_engine(
    config: EmailConfig, queue: asyncio.Queue[ChannelMessage], pushes: list[float] | None = None
) -> tuple[SyncEngine, asyncio.Task[None], StateStore]:
    metrics = Metrics()
    store = await StateStore(config.state_dir).open()

    async def factory(cfg: EmailConfig) -> ImapSession:
        session = await open_session(cfg)
        if pushes is not None:
            session._proto.changed = PushClock(pushes)
        return session

    engine = SyncEngine(
        config,
        store,
        InboundPipeline(config, metrics=metrics),
        metrics,
        backoff=Backoff(0.2, 1.0),
        session_factory=factory,
    )
    task = asyncio.create_task(engine.run(queue))
    await asyncio.wait_for(engine.synced.wait(), 30)
    return engine, task, store


async def stop_engine(task: asyncio.Task[None], store: StateStore) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench_latency(server: DovecotServer, tmp: Path, rounds: int) -> dict[str, float]:
    account = server.add_user()
    config = config_for(server, account, tmp / "lat")
    queue = TimedQueue()
    pushes: list[float] = []
    engine, task, store = await start_engine(config, queue, pushes)
    rng = random.Random(1)
    push_to_queue: list[float] = []
    lmtp_to_queue: list[float] = []
    try:
        for n in range(rounds):
            raw = make_message(n, "latency5k", rng)
            engine.synced.clear()
            await asyncio.sleep(0.05)  # let the engine settle into IDLE
            del pushes[:]
            sent = time.perf_counter()
            await asyncio.to_thread(server.deliver, account, raw)
            msg = await asyncio.wait_for(queue.get(), 10)
            got = queue.times[msg.id]
            lmtp_to_queue.append((got - sent) * 1000)
            if pushes:
                push_to_queue.append((got - pushes[0]) * 1000)
    finally:
        await stop_engine(task, store)
    return {
        "push_median": statistics.median(push_to_queue),
        "push_p99": pct(push_to_queue, 99),
        "lmtp_median": statistics.median(lmtp_to_queue),
        "lmtp_p99": pct(lmtp_to_queue, 99),
        "samples": len(push_to_queue),
    }


def read_default(raw: bytes) -> None:
    """The baseline of issue 13: a plain script reading one message's text."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(("plain", "html"))  # type: ignore[attr-defined]
    if body is not None:
        body.get_content()


def bare_imaplib(
    server: DovecotServer, account: Account, batch: int = 50, read: Any = email.message_from_bytes
) -> tuple[int, float, float]:
    """(messages read, wall seconds, CPU seconds of this thread: TLS, IMAP and parsing)."""
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    cpu = time.thread_time()
    start = time.perf_counter()
    imap = imaplib.IMAP4_SSL("127.0.0.1", server.imaps_port, ssl_context=ctx)
    imap.login(account.username, account.password)
    imap.select("INBOX", readonly=True)
    _, data = imap.uid("SEARCH", "ALL")
    uids = data[0].split()
    parsed = 0
    for i in range(0, len(uids), batch):
        _, resp = imap.uid("FETCH", b",".join(uids[i : i + batch]).decode(), "(BODY.PEEK[])")
        for part in resp:
            if isinstance(part, tuple):
                read(part[1])
                parsed += 1
    imap.logout()
    return parsed, time.perf_counter() - start, time.thread_time() - cpu


def rates(count: int, wall: float, cpu: float) -> tuple[float, float]:
    """(messages per wall-clock second, messages per CPU second)."""
    return count / wall, count / cpu


async def engine_drain(
    config: EmailConfig, expected: int, pipeline: str
) -> tuple[float, float, float]:
    """Drain the mailbox with the sync engine; returns (seconds, CPU seconds of the
    whole process: engine, store thread, worker threads), peak RSS MB)."""
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    got = 0
    done = asyncio.Event()

    async def consume() -> None:
        nonlocal got
        while True:
            await queue.get()
            got += 1
            if got >= expected:
                done.set()

    consumer = asyncio.create_task(consume())
    metrics = Metrics()
    store = await StateStore(config.state_dir).open()
    kind = BarePipeline if pipeline == "bare" else InboundPipeline
    engine = SyncEngine(config, store, kind(config, metrics=metrics), metrics)
    with peak_rss() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        task = asyncio.create_task(engine.run(queue))
        await asyncio.wait_for(done.wait(), 3600)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    consumer.cancel()
    await stop_engine(task, store)
    return elapsed, cpu, peak[0]


async def child(mode: str, config_json: str, expected: int, pipeline: str) -> None:
    """Runs in a fresh process so RSS reflects the channel alone (no test servers, no bench)."""
    config = EmailConfig(**json.loads(config_json))
    if mode == "idle":
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        _, task, store = await start_engine(config, queue)
        await asyncio.sleep(2.0)  # a couple of keepalive-free seconds in IDLE
        print(json.dumps({"rss": rss_mb()}))
        await stop_engine(task, store)
    else:
        elapsed, cpu, peak = await engine_drain(config, expected, pipeline)
        print(json.dumps({"elapsed": elapsed, "cpu": cpu, "peak": peak}))


def run_child(mode: str, config: EmailConfig, expected: int = 0, pipeline: str = "real") -> Any:
    data = {**json.loads(config.model_dump_json()), "password": config.imap_login[1]}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, json.dumps(data), str(expected), pipeline],
        capture_output=True,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bench child failed:\n{out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def big_message(megabytes: int) -> bytes:
    big = EmailMessage()
    big["From"] = SENDERS[0]
    big["Subject"] = "huge"
    big["Message-ID"] = "<huge@example.org>"
    big.set_content("see attachment")
    payload = random.Random(9).randbytes(megabytes * 1024 * 1024 * 3 // 4)
    big.add_attachment(payload, maintype="application", subtype="octet-stream", filename="b.bin")
    return big.as_bytes()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="backlog size")
    parser.add_argument("--latency", type=int, default=40, help="latency samples")
    parser.add_argument("--big-mb", type=int, default=50, help="size of the big message")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="prx-bench-") as tmpdir, DovecotServer() as server:
        tmp = Path(tmpdir)
        rows: list[tuple[str, str]] = []

        lat = await bench_latency(server, tmp, args.latency)
        rows.append(("push -> queue, median (5 KB)", f"{lat['push_median']:.1f} ms"))
        rows.append(("push -> queue, p99", f"{lat['push_p99']:.1f} ms"))
        rows.append(("LMTP delivery -> queue, median", f"{lat['lmtp_median']:.1f} ms"))
        rows.append(("LMTP delivery -> queue, p99", f"{lat['lmtp_p99']:.1f} ms"))

        # Idle RSS: an engine connected and in IDLE, in a process of its own.
        idle_acct = server.add_user()
        idle = run_child("idle", config_for(server, idle_acct, tmp / "idle"))
        rows.append(("idle RSS (engine, in this script's process image)", f"{idle['rss']:.1f} MB"))
        # A whole listening EmailChannel, in a process that imports only the package,
        # next to a bare aioimaplib IDLE client (bench/idle_rss.py), side by side.
        fields = {**json.loads(config_for(server, idle_acct, tmp / "idle2").model_dump_json())}
        fields["password"] = idle_acct.password
        for mode, label in (("channel", "listening EmailChannel"), ("bare", "bare aioimaplib")):
            out = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "idle_rss.py"), mode, json.dumps(fields)],
                capture_output=True, check=True, timeout=120,
            )  # fmt: skip
            rss = json.loads(out.stdout.decode().strip().splitlines()[-1])["rss"]
            rows.append((f"idle RSS, {label} (own process)", f"{rss:.1f} MB"))

        rng = random.Random(5)
        backlog = server.add_user()
        print(f"filling a backlog of {args.count} messages ...", file=sys.stderr)
        messages = [make_message(i, k, rng) for i, k in enumerate(backlog_kinds(args.count))]
        total_mb = sum(map(len, messages)) / 1e6
        await asyncio.to_thread(lmtp_fill, server, backlog, messages)
        del messages

        drains = iter(range(1_000))

        def drain(pipeline: str) -> Any:
            state = tmp / f"drain-{pipeline}-{next(drains)}"  # a fresh cursor each time
            cfg = config_for(server, backlog, state, initial_sync="unseen",
                             attachments_dir=state / "att")  # fmt: skip
            return run_child("drain", cfg, args.count, pipeline)

        print("draining ...", file=sys.stderr)
        # Alternating, each three times, best of three: the machine's noise hits all
        # alike. Wall-clock rates, and rates per CPU second (what each side spends
        # itself, which load from other processes does not change).
        walls: dict[str, list[float]] = {"bare": [], "default": [], "transport": [], "real": []}
        cpus: dict[str, list[float]] = {name: [] for name in walls}
        peak_real = 0.0
        for _ in range(3):
            for name, read in (("bare", email.message_from_bytes), ("default", read_default)):
                n, wall, cpu = await asyncio.to_thread(bare_imaplib, server, backlog, 50, read)
                for into, value in zip((walls, cpus), rates(n, wall, cpu), strict=True):
                    into[name].append(value)
            for name, pipeline in (("transport", "bare"), ("real", "real")):
                out = drain(pipeline)
                for into, value in zip(
                    (walls, cpus), rates(args.count, out["elapsed"], out["cpu"]), strict=True
                ):
                    into[name].append(value)
                if name == "real":
                    peak_real = max(peak_real, out["peak"])
        wall, cpu = {k: max(v) for k, v in walls.items()}, {k: max(v) for k, v in cpus.items()}
        rows.append((f"backlog drain ({args.count} msgs, {total_mb:.0f} MB)", "wall | per CPU s"))

        def row(label: str, key: str) -> None:
            rows.append((label, f"{wall[key]:.0f} msg/s | {cpu[key]:.0f} msg/CPU-s"))

        def ratio(label: str, top: str, bottom: str) -> None:
            rows.append((label, f"{wall[top] / wall[bottom]:.2f} | {cpu[top] / cpu[bottom]:.2f}"))

        row("  bare imaplib + message_from_bytes", "bare")
        row("  bare imaplib + policy=default + get_body().get_content()", "default")
        row("  sync engine, same parsing as bare", "transport")
        ratio("  ratio (engine / bare)", "transport", "bare")
        row("  sync engine + real inbound pipeline", "real")
        ratio("  ratio (engine + pipeline / bare)", "real", "bare")
        ratio("  ratio (engine + pipeline / policy=default baseline)", "real", "default")
        rows.append(("  peak RSS, engine + real pipeline", f"{peak_real:.1f} MB"))
        print(json.dumps({"wall": walls, "cpu": cpus}), file=sys.stderr)

        # A big message in the folder: the same small drain with and without it.
        small = 200
        peaks: list[float] = []
        for with_big in (False, True):
            acct = server.add_user()
            msgs = [make_message(i, "plain2k", rng) for i in range(small)]
            await asyncio.to_thread(lmtp_fill, server, acct, msgs[: small // 2])
            if with_big:
                await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        __file__,
                        "--deliver-big",
                        str(server.lmtp_port),
                        acct.address,
                        str(args.big_mb),
                    ],
                    check=True,
                )
            await asyncio.to_thread(lmtp_fill, server, acct, msgs[small // 2 :])
            state = tmp / f"big{with_big}"
            cfg = config_for(server, acct, state, initial_sync="unseen")
            peaks.append(run_child("drain", cfg, small + with_big, "real")["peak"])
        rows.append((f"peak RSS, {small} msgs", f"{peaks[0]:.1f} MB"))
        rows.append((f"peak RSS, {small} msgs + one {args.big_mb} MB msg", f"{peaks[1]:.1f} MB"))
        rows.append(("  difference", f"{peaks[1] - peaks[0]:+.1f} MB"))

    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        mode, cfg, expected, pipe = sys.argv[2:6]
        asyncio.run(child(mode, cfg, int(expected), pipe))
    elif sys.argv[1:2] == ["--deliver-big"]:
        port, rcpt, mb = sys.argv[2:5]
        with smtplib.LMTP("127.0.0.1", int(port), local_hostname="localhost") as lmtp:
            lmtp.sendmail("sender@example.org", [rcpt], big_message(int(mb)))
    else:
        asyncio.run(main())
