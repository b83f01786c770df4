"""Benchmark: memory of a child ``prx-email run`` over a long run (issue 23, item 14).

A real Dovecot and the aiosmtpd fixture (tests/servers) on loopback; a child
``prx-email run bench_soak:handle`` (this file is also the child's handler
module) listens with the default hand-off (``ack``) and answers every tenth
message, so its replies go through the durable outbox to SMTP. The parent:

* delivers ``--messages`` mails over one LMTP connection, from 20 allowed
  senders, in the mix 90 % plain 1-3 KB, 9 % HTML with a text part ~20 KB,
  1 % a 256 KB text body; it keeps at most ``--window`` delivered and not yet
  handled, so the channel sets the pace (no sleeps per message) and the server
  never holds a backlog that would change what is measured;
* kicks the account's IMAP sessions (``doveadm kick``) every ``--kick-secs``;
* expunges the handled mail every ``--expunge-every`` messages, as a person's
  other mail client would delete it (Dovecot's maildir slows with the folder's
  size: without it LMTP and IMAP fell from 100 to 20 mails/s by 20,000 messages,
  and the bench would measure the server);
* reads the child's RSS and VmHWM (``/proc/PID/status``) every ``--sample-secs``
  and scrapes its ``/metrics`` endpoint at each kick (so that path runs too);
* at the end checks: every message handed on (0 lost), none twice, one reply
  accepted by SMTP for each tenth message.

It prints the RSS median per quarter of the messages, the slope of RSS over the
last half (MiB per 1,000 messages, least squares) and a verdict: levels off when
that slope stays under ``--flat`` MiB per 1,000 messages. Then the resident memory
by kind of mapping at each quarter, and glibc's ``mallinfo2`` (in use and free
inside its arenas), which the child writes every 2,000 messages: growth that
tracemalloc does not see is C (SQLite's page cache, OpenSSL, the allocator).

The limits are set so that nothing is deferred (a million per 60 s window; the
limiter keeps at most count + 1 timestamps per key, and a window's worth at most).

    python bench/bench_soak.py                         # 100,000 messages
    python bench/bench_soak.py --messages 20000 --tracemalloc 5000

``--tracemalloc N`` makes the child trace its allocations and, every N
messages, write the 25 biggest growths since the first snapshot to
``tracemalloc.txt`` in the run directory (``--keep`` keeps that directory).
Tracing costs a lot of speed and memory of its own: use it to find what grows,
never for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
OUT_ENV = "SOAK_OUT"
TRACE_ENV = "SOAK_TRACEMALLOC"
SENDERS = [f"person{i}@example.com" for i in range(20)]

# --------------------------------------------------------------------------- the child's side

_child: dict[str, Any] = {"n": 0, "fh": None, "trace": None}


def _trace_step(every: int, out_dir: Path) -> None:
    import tracemalloc

    if _child["trace"] is None:
        _child["trace"] = tracemalloc.take_snapshot()
        return
    now = tracemalloc.take_snapshot()
    top = now.compare_to(_child["trace"], "lineno")[:25]
    with (out_dir / "tracemalloc.txt").open("a") as fh:
        fh.write(f"=== after {_child['n']} messages (growth since the first snapshot)\n")
        for stat in top:
            fh.write(f"{stat}\n")


def _mallinfo_step(out_dir: Path) -> None:
    """glibc's own account (mallinfo2): bytes in use vs free inside its arenas."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    mib = {
        n: round(getattr(info, n) / 2**20, 2) for n in ("arena", "hblkhd", "uordblks", "fordblks")
    }
    with (out_dir / "mallinfo.txt").open("a") as fh:
        fh.write(f"{_child['n']} {json.dumps(mib)}\n")


async def handle(msg: Any) -> str | None:
    """The child's handler: report each message; answer every tenth."""
    if _child["fh"] is None:
        _child["fh"] = open(os.environ[OUT_ENV], "a", buffering=1)  # noqa: SIM115
        package = sys.modules["prx_channel_email"].__file__
        (Path(os.environ[OUT_ENV]).parent / "package.txt").write_text(f"{package}\n")
    _child["n"] += 1
    n = int(msg.subject.rsplit(" ", 1)[-1]) if msg.subject.startswith("soak ") else -1
    _child["fh"].write(f"{n} {int(msg.redelivered)}\n")
    every = int(os.environ.get(TRACE_ENV, "0"))
    if every and _child["n"] % every == 0:
        _trace_step(every, Path(os.environ[OUT_ENV]).parent)
    if _child["n"] % 2000 == 0:
        _mallinfo_step(Path(os.environ[OUT_ENV]).parent)
    if n >= 0 and n % 10 == 0:
        return f"Thanks for message {n}.\n\n(soak reply)"
    return None


# --------------------------------------------------------------------------- the mail

_WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"]


def _text(n: int, size: int) -> str:
    words = [_WORDS[(n + i) % len(_WORDS)] for i in range(size // 6)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines) + "\n"


def make_mail(n: int, account: str) -> bytes:
    """Message ``n`` of the soak (its kind chosen by ``n``, so each run is the same)."""
    sender = SENDERS[n % len(SENDERS)]
    head = (
        f"From: Person <{sender}>\r\nTo: {account}\r\nSubject: soak {n}\r\n"
        f"Message-ID: <soak-{n}@bench.example>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if n % 100 == 99:  # 1 %: a large text body
        body = _text(n, 256 * 1024)
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    if n % 10 == 5:  # 9 %: HTML with a text alternative
        text = _text(n, 8 * 1024)
        rows = "".join(f"<tr><td>{i}</td><td>{w}</td></tr>" for i, w in enumerate(text.split()))
        html = f"<html><body><p>Hello</p><table>{rows}</table></body></html>"
        return (
            head + 'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
            "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--b1--\r\n"
        ).encode()
    body = f"Hello, this is message {n}.\n\n" + _text(n, 1024 + (n % 7) * 300)
    return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()


# --------------------------------------------------------------------------- the parent's side


def status_kb(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def rss_by_kind(pid: int) -> dict[str, float]:
    """The child's resident memory by kind of mapping (MiB): the C heap (``[heap]``,
    where small malloc blocks and Python's arenas below the mmap threshold live),
    anonymous mappings (thread arenas, large blocks, pymalloc arenas), files (code)."""
    kinds: dict[str, float] = {}
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's first line
            name = head[5] if len(head) > 5 else ""
            kind = (
                "heap" if name == "[heap]"
                else "anon" if not name
                else "stack" if name.startswith("[stack")
                else "sqlite-shm" if name.endswith("-shm")
                else "file" if name.startswith("/")
                else "other"
            )  # fmt: skip
        elif head and head[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0.0) + int(head[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(kinds.items())}


class Tail:
    """Reads the child's report file as it grows: handed-on counts per message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buffer = b""
        self.seen: dict[int, int] = {}
        self.redelivered = 0
        self.prefix = 0

    def contiguous(self) -> int:
        """How many messages from the first on have all been handed on (message n is
        UID n + 1: one LMTP connection into a new folder delivers them in order)."""
        while self.prefix in self.seen:
            self.prefix += 1
        return self.prefix

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
            self.offset += len(chunk)
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                n, red = line.split()
                self.seen[int(n)] = self.seen.get(int(n), 0) + 1
                self.redelivered += int(red)
        return len(self.seen)


def child_config(server: Any, account: Any, smtp: Any, state: Path, metrics_port: int) -> str:
    fields = {
        "imap_host": "127.0.0.1",
        "imap_port": server.imaps_port,
        "ca_file": str(server.ca_file),
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.tls_port,
        "smtp_security": "tls",
        "smtp_username": smtp.username,
        "smtp_password": smtp.password,
        "username": account.username,
        "password": account.password,
        "from_address": account.address,
        "allowed_senders": SENDERS,
        "sender_auth": "off",
        "rate_limit_count": 1_000_000,
        "domain_rate_limit_count": 1_000_000,
        # The limiter keeps the newest count + 1 timestamps per sender and domain, at
        # most a window's worth: under these high limits a 60 s window reaches that
        # bound within the run (the default hour would hold 270,000 at 75 mail/s).
        "rate_limit_window_secs": 60,
        "state_dir": str(state),
        "metrics_port": metrics_port,
    }
    return "[channels_config.email]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in fields.items()
    )


def regression_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def report(samples: list[tuple[float, int, int, int]], total: int, flat: float) -> dict[str, Any]:
    """Medians per quarter of the messages and the slope over the last half."""
    quarters = []
    for q in range(4):
        lo, hi = total * q / 4, total * (q + 1) / 4
        rss = [s[2] / 1024 for s in samples if lo <= s[1] < hi or (q == 3 and s[1] == total)]
        quarters.append(round(statistics.median(rss), 1) if rss else None)
    half = [s for s in samples if s[1] >= total / 2]
    slope = regression_slope([s[1] / 1000 for s in half], [s[2] / 1024 for s in half])
    q2, q4 = quarters[1], quarters[3]
    per_k_q = (q4 - q2) / (total / 2 / 1000) if q2 is not None and q4 is not None else None
    return {
        "rss_median_per_quarter_mib": quarters,
        "q2_to_q4_mib_per_1000": round(per_k_q, 3) if per_k_q is not None else None,
        "last_half_slope_mib_per_1000": round(slope, 3),
        "vmhwm_mib": round(max(s[3] for s in samples) / 1024, 1),
        "levels_off": abs(slope) < flat,
    }


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.servers.certs import make_pki
    from tests.servers.dovecot import DovecotServer, free_ports
    from tests.servers.smtp import SmtpServer

    tmp = Path(tempfile.mkdtemp(prefix="prx-soak-"))
    pki = make_pki(tmp / "pki")
    server = DovecotServer(pki=pki)
    smtp = SmtpServer(pki)
    server.start()
    smtp.start()
    child: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    try:
        account = server.add_user()
        (metrics_port,) = free_ports(1)
        cfg = tmp / "config.toml"
        cfg.write_text(child_config(server, account, smtp, tmp / "state", metrics_port))
        out = tmp / "out.txt"
        env = {
            **os.environ,
            OUT_ENV: str(out),
            "PYTHONPATH": f"{Path(args.checkout).resolve()}{os.pathsep}{BENCH}",
        }
        if args.tracemalloc:
            env.update(PYTHONTRACEMALLOC="1", **{TRACE_ENV: str(args.tracemalloc)})
        log_path = tmp / "child.log"
        with log_path.open("wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "prx_channel_email.cli", "run", "bench_soak:handle",
                 "-c", str(cfg)],
                env=env, stdout=log, stderr=log, cwd=tmp,  # not ours: -m puts cwd first
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while b"inbound.first_start" not in log_path.read_bytes():
            if time.monotonic() > deadline or child.poll() is not None:
                print(log_path.read_text()[-3000:])
                return 2
            time.sleep(0.1)

        tail = Tail(out)
        total = args.messages
        delivered = [0]
        failure: list[BaseException] = []

        def inject() -> None:
            """One LMTP connection (renewed every 2,000 mails); at most ``window`` ahead."""
            try:
                lmtp: smtplib.LMTP | None = None
                for n in range(total):
                    while n - handled[0] >= args.window and not stop.is_set():
                        time.sleep(0.005)
                    if stop.is_set():
                        return
                    if lmtp is None or n % 2000 == 0:
                        if lmtp is not None:
                            lmtp.quit()
                        lmtp = smtplib.LMTP(server.host, server.lmtp_port, timeout=60)
                        lmtp.ehlo("localhost")
                    lmtp.sendmail(SENDERS[n % len(SENDERS)], [account.address],
                                  make_mail(n, account.address))  # fmt: skip
                    delivered[0] = n + 1
                if lmtp is not None:
                    lmtp.quit()
            except BaseException as exc:  # reported by the main loop
                failure.append(exc)

        handled = [0]
        injector = threading.Thread(target=inject, name="soak-inject", daemon=True)
        samples: list[tuple[float, int, int, int]] = []
        by_kind: dict[str, dict[str, float]] = {}
        kicks = scrapes = expunged = 0
        start = last_kick = last_sample = last_print = time.monotonic()
        injector.start()
        expected_replies = len(range(0, total, 10))
        while True:
            handled[0] = tail.poll()
            now = time.monotonic()
            if child.poll() is not None:
                print("the child stopped:\n" + log_path.read_text()[-3000:])
                return 2
            if failure:
                raise failure[0]
            if now - last_sample >= args.sample_secs:
                rss, hwm = status_kb(child.pid)
                samples.append((now - start, handled[0], rss, hwm))
                last_sample = now
                mark = f"{handled[0] * 4 // total}/4"  # the first sample in each quarter
                if mark not in by_kind:
                    by_kind[mark] = rss_by_kind(child.pid)
            if now - last_kick >= args.kick_secs:
                server.kick(account)
                kicks += 1
                last_kick = now
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10):
                    scrapes += 1
            # The handled mail leaves the folder, as a person's other client would delete
            # it: Dovecot's maildir costs grow with the folder (LMTP and IMAP slowed
            # from 100 to 20 mails/s by 20,000), which would measure the server.
            done = tail.contiguous()
            if done - expunged >= args.expunge_every:
                server.doveadm("expunge", "-u", account.username, "mailbox", "INBOX",
                               "uid", f"1:{done}", timeout=120)  # fmt: skip
                expunged = done
            if now - last_print >= 30:
                rss, _ = status_kb(child.pid)
                print(f"{now - start:7.0f}s handled {handled[0]:>7} delivered {delivered[0]:>7} "
                      f"replies {len(smtp.messages):>6} rss {rss / 1024:6.1f} MiB "
                      f"rate {handled[0] / (now - start):6.1f}/s", flush=True)  # fmt: skip
                last_print = now
            if handled[0] >= total and len(smtp.messages) >= expected_replies:
                break
            if now - start > args.max_secs:
                print("time is up")
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        rss, hwm = status_kb(child.pid)
        samples.append((elapsed, handled[0], rss, hwm))
        by_kind["end"] = rss_by_kind(child.pid)
        time.sleep(1.0)  # a late duplicate would show here
        tail.poll()
        replied = {str(m.message().get("In-Reply-To", "")) for m in smtp.messages}
        want = {f"<soak-{n}@bench.example>" for n in range(0, total, 10)}
        result = {
            "package": (tmp / "package.txt").read_text().strip(),
            "messages": total,
            "seconds": round(elapsed),
            "rate_per_s": round(handled[0] / elapsed, 1),
            "lost": sum(1 for n in range(total) if n not in tail.seen),
            "handed_on_twice": sum(1 for c in tail.seen.values() if c > 1),
            "redelivered_flag": tail.redelivered,
            "replies_accepted": len(smtp.messages),
            "replies_expected": expected_replies,
            "replies_missing": len(want - replied),
            "kicks": kicks,
            "metrics_scrapes": scrapes,
            "expunged_through": expunged,
            **report(samples, total, args.flat),
        }
        print(json.dumps(result), flush=True)
        print("resident MiB by mapping, at the start of each quarter and at the end:")
        for mark, kinds in by_kind.items():
            print(f"  {mark:>4} {json.dumps(kinds)}")
        info_file = tmp / "mallinfo.txt"
        mallinfo = info_file.read_text().splitlines() if info_file.exists() else []
        if mallinfo:
            print("glibc mallinfo2 (MiB) after N messages:")
            for line in mallinfo[:: max(1, len(mallinfo) // 8)] + mallinfo[-1:]:
                print(f"  {line}")
        (tmp / "samples.json").write_text(json.dumps(samples))
        ok = (
            result["lost"] == 0 and result["handed_on_twice"] == 0 and not result["replies_missing"]
        )
        return 0 if ok else 1
    finally:
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(40)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        smtp.stop()
        server.close()
        if args.keep:
            print(f"run directory kept: {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=200, help="most delivered, not handled")
    parser.add_argument("--kick-secs", type=float, default=60.0)
    parser.add_argument("--expunge-every", type=int, default=2000, help="messages")
    parser.add_argument("--sample-secs", type=float, default=2.0)
    parser.add_argument("--flat", type=float, default=0.05, help="MiB per 1,000 messages")
    parser.add_argument("--max-secs", type=float, default=3 * 3600)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="N")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--checkout", default=str(ROOT), help="the tree the child runs")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
