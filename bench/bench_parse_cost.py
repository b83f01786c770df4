"""Per-message parsing cost by kind of message: where the inbound drain's time goes.

For each kind of the inbound benchmark's backlog (plain 2 KB, multipart 20 KB,
200 KB attachment) it times, in one process and one run:

* ``email.message_from_bytes`` (what the bare baseline loop of bench_inbound does),
* ``message_from_bytes(policy=default)`` + ``get_body(('plain', 'html')).get_content()``
  (bench_inbound's issue-13 baseline),
* ``mailparser.parse_from_bytes`` (the edge-path parser),
* ``inbound.analyze_body`` (parse + text + quote stripping + attachment planning),
* ``InboundPipeline.process`` (all of it, with the policy and attachment saving).

    python bench/bench_parse_cost.py [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import email
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mailparser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inbound import backlog_kinds, make_message, read_default  # noqa: E402

from prx_channel_email._inbound.pipeline import InboundPipeline, analyze_body, read_envelope  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402

KINDS = ("plain2k", "multi20k", "attach200k")
SHARE = {"plain2k": 0.6, "multi20k": 0.3, "attach200k": 0.1}  # bench_inbound's mix


def _analyze(raw: bytes, config: EmailConfig) -> object:
    body, env = read_envelope(raw, 0.0)
    return analyze_body(raw, config, env, body)


def per_message_ms(fn: Callable[[bytes], object], messages: list[bytes]) -> float:
    start = time.perf_counter()
    for raw in messages:
        fn(raw)
    return (time.perf_counter() - start) / len(messages) * 1e3


async def pipeline_ms(pipe: InboundPipeline, messages: list[bytes]) -> float:
    start = time.perf_counter()
    for raw in messages:
        await pipe.process(raw)
    return (time.perf_counter() - start) / len(messages) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="messages per kind")
    args = parser.parse_args()
    rng = random.Random(7)
    config = EmailConfig(
        imap_host="127.0.0.1",
        smtp_host="127.0.0.1",
        username="bot",
        password="unused",  # type: ignore[arg-type]
        from_address="bot@example.test",
        allowed_senders=["*"],
        sender_auth="off",  # the generated mail carries no Authentication-Results
        rate_limit_count=10**9,
        state_dir=Path(tempfile.mkdtemp(prefix="bench-parse-")),
    )
    pipe = InboundPipeline(config)
    print(f"{'kind':12s} {'size':>8s} {'stdlib':>8s} {'default':>8s} {'mailparser':>11s} "
          f"{'analyze':>8s} {'process':>8s}   (ms per message)")  # fmt: skip
    mix = {"stdlib": 0.0, "default": 0.0, "mailparser": 0.0, "process": 0.0}
    for kind in KINDS:
        messages = [make_message(i, kind, rng) for i in range(args.count)]
        stdlib = per_message_ms(email.message_from_bytes, messages)
        default = per_message_ms(read_default, messages)
        mp = per_message_ms(mailparser.parse_from_bytes, messages)
        analyze = per_message_ms(lambda raw: _analyze(raw, config), messages)
        process = asyncio.run(pipeline_ms(pipe, messages))
        print(f"{kind:12s} {len(messages[0]):8d} {stdlib:8.3f} {default:8.3f} {mp:11.3f} "
              f"{analyze:8.3f} {process:8.3f}")  # fmt: skip
        for name, value in (
            ("stdlib", stdlib),
            ("default", default),
            ("mailparser", mp),
            ("process", process),
        ):
            mix[name] += SHARE[kind] * value
    print(f"{'mix 60/30/10':12s} {'':8s} {mix['stdlib']:8.3f} {mix['default']:8.3f} "
          f"{mix['mailparser']:11.3f} {'':8s} {mix['process']:8.3f}")  # fmt: skip

    # The mix itself in CPU time (load from other processes does not change it), as
    # IMAP serves it (CRLF), three rounds.
    backlog = [make_message(i, k, rng).replace(b"\n", b"\r\n")
               for i, k in enumerate(backlog_kinds(1000))]  # fmt: skip
    for _ in range(3):
        start = time.process_time()
        asyncio.run(pipeline_ms(pipe, backlog))
        spent = time.process_time() - start
        start = time.process_time()
        for raw in backlog:
            read_default(raw)
        baseline = time.process_time() - start
        print(f"mix, CPU ms per message: pipeline {spent / len(backlog) * 1e3:.3f}, "
              f"policy=default + get_content {baseline / len(backlog) * 1e3:.3f} "
              f"({baseline / spent:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
