"""What the rate limits and the loop guard cost per message, next to the pipeline.

In one process and one run it times:

* ``HandoffGate.judge`` for fresh mail (1,000 senders in 50 domains, a third of
  the mail quick answers to bot replies), under limits nothing exceeds;
* the same with every sender over its limit (each message goes in line);
* one release pass (``due`` + ``next_due``) over a line of 10,000 waiting messages;
* ``InboundPipeline.process`` of a plain 2 KB message (the baseline: what every
  accepted message costs anyway).

Figures are per message (or per pass) and as a ratio to the baseline.

    python bench/bench_ratelimit.py [--count 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inbound import make_message  # noqa: E402

from prx_channel_email._inbound.pipeline import InboundPipeline  # noqa: E402
from prx_channel_email._inbound.ratelimit import HandoffGate, Limits  # noqa: E402
from prx_channel_email._mail.message_ids import mint_message_id  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def mail(count: int, rng: random.Random) -> list[tuple[str, str, str | None]]:
    out = []
    for n in range(count):
        sender = f"p{rng.randrange(1000)}@d{rng.randrange(50)}.example"
        parent = mint_message_id("bot@example.net") if n % 3 == 0 else None
        out.append((f"<m{n}@x>", sender, parent))
    return out


def judge_us(limits: Limits, messages: list[tuple[str, str, str | None]]) -> tuple[float, int]:
    clock = Clock()
    gate = HandoffGate(limits, clock)
    waiting = 0
    start = time.perf_counter()
    for mid, sender, parent in messages:
        clock.now += 0.001
        _, w = gate.judge(mid, sender, parent, [parent] if parent else [], mid)
        if w is not None:
            w.stored = True
            waiting += 1
    return (time.perf_counter() - start) / len(messages) * 1e6, waiting


def release_pass_ms(limits: Limits, line: int) -> float:
    clock = Clock()
    gate = HandoffGate(limits, clock)
    for n in range(line):
        _, w = gate.judge(f"<w{n}@x>", f"p{n % 100}@d{n % 10}.example")
        if w is not None:
            w.stored = True
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        gate.due()
        gate.next_due()
    return (time.perf_counter() - start) / rounds * 1e3


async def pipeline_us(count: int, rng: random.Random) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = EmailConfig(
            imap_host="127.0.0.1",
            smtp_host="127.0.0.1",
            username="bot",
            password="x",
            from_address="bot@example.test",
            allowed_senders=["*"],
            sender_auth="off",
            state_dir=Path(tmp),
        )
        pipe = InboundPipeline(config)
        messages = [make_message(n, "plain2k", rng) for n in range(count)]
        start = time.perf_counter()
        for raw in messages:
            await pipe.process(raw)
        return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(7)
    messages = mail(args.count, rng)
    roomy = Limits(10**9, 10**9, 3600, 30, 10**9, 3600)
    tight = Limits(1, 10**9, 3600, 30, 10**9, 3600)
    base = asyncio.run(pipeline_us(max(args.count // 20, 200), rng))
    fresh, _ = judge_us(roomy, messages)
    over, waiting = judge_us(tight, messages)
    line = release_pass_ms(Limits(1, 10**9, 3600, 30, 3, 3600), 10_000)
    print(f"pipeline.process, plain 2 KB (baseline): {base:8.1f} us/message")
    print(f"judge, under the limits:                {fresh:8.2f} us/message ({fresh / base:.2%})")
    print(f"judge, over the limit ({waiting} wait):    {over:8.2f} us/message ({over / base:.2%})")
    print(f"release pass over 10,000 waiting:       {line:8.2f} ms/pass")


if __name__ == "__main__":
    main()
