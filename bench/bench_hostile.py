"""Benchmark: the hostile mail shapes of issue 23 against a child ``prx-email run``.

For each shape a fresh child ``prx-email run bench_hostile:handle`` listens on a
real Dovecot (started like the test fixture). This file is also the child's
handler module: its first call starts a heartbeat task on the child's event
loop (a 5 ms sleep in a loop, recording the longest gap between wake-ups), and
every call appends a line to ``$HOSTILE_OUT``. Per shape:

1. a small warm-up mail: once it is handled, the heartbeat runs and the child's
   peak RSS (VmHWM) is reset (``/proc/PID/clear_refs``);
2. the hostile mail, then a small mail after it (the engine works in order, so
   once the after-mail is handled the hostile one is settled, handed on or not);
3. read: the longest heartbeat gap since the reset, VmHWM minus the RSS before
   the hostile mail (as a multiple of the message size), and how much the state
   directory grew.

    python bench/bench_hostile.py [--mb 24] [--only quoted,control] [--checkout OLD_TREE]

Bounds (docs/concepts/security.md, "Work bounds"): the loop's longest gap stays
under 250 ms for every shape; peak memory at most 5x the message size (3.0-3.7x
measured). ``--checkout`` runs the child from that tree (its cwd too: ``-m`` puts
the cwd first on the path) for a baseline in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
OUT_ENV = "HOSTILE_OUT"

# --------------------------------------------------------------------------- the child's side

_gap = {"max": 0.0}
_beat: list[asyncio.Task[None]] = []


async def _heartbeat() -> None:
    last = time.perf_counter()
    while True:
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        _gap["max"] = max(_gap["max"], now - last - 0.005)
        last = now


async def handle(msg: Any) -> None:
    """The child's handler: start the heartbeat, report each message and the gap so far."""
    if not _beat:
        _beat.append(asyncio.create_task(_heartbeat()))
    with open(os.environ[OUT_ENV], "a") as fh:
        fh.write(json.dumps({"id": msg.id, "gap": _gap["max"], "chars": len(msg.content)}) + "\n")
    if "warmup" in msg.id:
        _gap["max"] = 0.0
    return None


# --------------------------------------------------------------------------- the shapes

LINE = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\n"


def _text(body: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "anna@example.com"
    msg["To"] = "bot@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@bench.example>"
    msg.set_content(body, cte="8bit")
    return bytes(msg)


def _nested(size: int, subject: str) -> bytes:
    """multipart/mixed nested as deep as ``size`` bytes allow, its type spelled
    "mUltipart" (a case-sensitive count of nested multiparts missed it)."""
    head = (
        f"From: anna@example.com\r\nTo: bot@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@bench.example>\r\nMIME-Version: 1.0\r\n"
    )
    opening, closing = [], []
    depth = 0
    while sum(map(len, opening)) * 2 < size:
        b = f"b{depth}"
        opening.append(f'Content-Type: mUltipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\n')
        closing.append(f"\r\n--{b}--\r\n")
        depth += 1
    body = "Content-Type: text/plain\r\n\r\nhi\r\n"
    return (head + "".join(opening) + body + "".join(reversed(closing))).encode()


def shapes(size: int) -> dict[str, Callable[[], bytes]]:
    return {
        "plain": lambda: _text(LINE * (size // len(LINE)), "plain"),
        "control": lambda: _text("\x01" * size, "control"),
        "quoted": lambda: _text("> \n" * (size // 4), "quoted"),  # 4 bytes a line as stored
        "oneline": lambda: _text("x" * size, "oneline"),
        "allquoted15": lambda: _text("> an old line, quoted\n" * (15 * 2**20 // 22), "allquoted15"),
        "quotes": lambda: _text('"' * size, "quotes"),
        "nested57k": lambda: _nested(57 * 1024, "nested57k"),
    }


# --------------------------------------------------------------------------- the bench's side


def small(subject: str) -> bytes:
    return _text("hello\n", subject)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def wait_for_id(out: Path, wanted: str, within: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if out.exists():
            for line in out.read_text().splitlines():
                row = json.loads(line)
                if wanted in row["id"]:
                    return dict(row)
        time.sleep(0.05)
    raise TimeoutError(wanted)


def run_shape(server: Any, name: str, raw: bytes, tmp: Path, checkout: Path) -> dict[str, Any]:
    account = server.add_user()
    state = tmp / name / "state"
    cfg = tmp / name / "config.toml"
    cfg.parent.mkdir(parents=True)
    fields = {
        "imap_host": "127.0.0.1",
        "imap_port": server.imaps_port,
        "ca_file": str(server.ca_file),
        "smtp_host": "127.0.0.1",
        "smtp_port": 9,
        "username": account.username,
        "password": account.password,
        "from_address": account.address,
        "allowed_senders": ["*"],
        "sender_auth": "off",
        "rate_limit_count": 1_000_000,
        "handoff": "ack",
        "state_dir": str(state),
    }
    cfg.write_text(
        "[channels_config.email]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    )
    out = tmp / name / "out.jsonl"
    env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": f"{checkout}{os.pathsep}{BENCH}"}
    log = (tmp / name / "child.log").open("wb")
    child = subprocess.Popen(
        [sys.executable, "-m", "prx_channel_email.cli", "run", "bench_hostile:handle", "-c",
         str(cfg)],
        env=env, stdout=log, stderr=log, cwd=checkout,  # -m puts the cwd first on the path
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while b"inbound.first_start" not in (tmp / name / "child.log").read_bytes():
            if time.monotonic() > deadline or child.poll() is not None:
                sys.exit("the child did not sync:\n" + (tmp / name / "child.log").read_text())
            time.sleep(0.05)
        server.deliver(account, small("warmup"))
        try:
            wait_for_id(out, "warmup", 120)
        except TimeoutError:
            sys.exit("the child did not start:\n" + (tmp / name / "child.log").read_text()[-3000:])
        Path(f"/proc/{child.pid}/clear_refs").write_text("5")
        time.sleep(0.2)
        rss_before = status_kb(child.pid, "VmRSS")
        state_before = dir_bytes(state)
        server.deliver(account, raw, timeout=120)
        server.deliver(account, small("after"))
        row = wait_for_id(out, "after")
        hostile = next(
            (json.loads(line) for line in out.read_text().splitlines() if name in line), None
        )
        hwm = status_kb(child.pid, "VmHWM")
        grew = dir_bytes(state) - state_before
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    size = len(raw)
    return {
        "shape": name,
        "size_mb": round(size / 2**20, 2),
        "max_gap_ms": round(row["gap"] * 1000, 1),
        "peak_mb": round((hwm - rss_before) / 1024, 1),
        "peak_x": round((hwm - rss_before) * 1024 / size, 2),
        "state_mb": round(grew / 2**20, 2),
        "handed_on": hostile is not None,
        "content_chars": hostile["chars"] if hostile else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=24, help="size of the big shapes (MB)")
    parser.add_argument("--only", default="", help="comma-separated shape names")
    parser.add_argument(
        "--checkout", default=str(ROOT), help="the tree whose package the child runs (a baseline)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.servers.dovecot import DovecotServer

    wanted = [s for s in args.only.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prx-hostile-") as tmpdir, DovecotServer() as server:
        for name, make in shapes(args.mb * 2**20).items():
            if wanted and name not in wanted:
                continue
            row = run_shape(server, name, make(), Path(tmpdir), Path(args.checkout).resolve())
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(f"{'shape':<12} {'MB':>6} {'max gap ms':>11} {'peak MB':>8} {'peak x':>7} "
          f"{'state MB':>9} handed on")  # fmt: skip
    for r in rows:
        print(f"{r['shape']:<12} {r['size_mb']:>6} {r['max_gap_ms']:>11} {r['peak_mb']:>8} "
              f"{r['peak_x']:>7} {r['state_mb']:>9} {r['handed_on']}")  # fmt: skip


if __name__ == "__main__":
    main()
