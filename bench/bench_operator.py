"""Benchmark: how long a new user waits for the demo's reply, and a doctor run.

Both run against the in-process sandbox (loopback, no TLS), so the numbers show
the channel's own overhead, not a provider's latency.

    python bench/bench_operator.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email._demo.sandbox import MailSandbox  # noqa: E402
from prx_channel_email.cli import run_demo  # noqa: E402
from prx_channel_email.doctor import run_doctor  # noqa: E402


async def demo_once() -> float:
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        code = await run_demo(console=quiet, state_dir=Path(tmp))
        elapsed = time.perf_counter() - start
    assert code == 0
    return elapsed


async def doctor_once() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with MailSandbox() as sandbox:
            config = sandbox.channel_config(Path(tmp))
            start = time.perf_counter()
            report = await run_doctor(config)
            elapsed = time.perf_counter() - start
    assert report.exit_code == 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, fn in (("demo (sample mail -> reply)", demo_once), ("doctor", doctor_once)):
        times = [asyncio.run(fn()) for _ in range(args.rounds)]
        print(
            f"{name:30s} median {statistics.median(times) * 1000:7.0f} ms   "
            f"min {min(times) * 1000:7.0f} ms   max {max(times) * 1000:7.0f} ms   "
            f"({args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
