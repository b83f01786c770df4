"""Peak memory of the inbound pipeline for one big message, as a multiple of its size.

Two measures while ``InboundPipeline.process`` handles one message, for three
shapes of a message of the given size (one big base64 attachment, one big
text/plain body, one big HTML body):

* the peak of Python allocations (tracemalloc) above what was allocated before
  (the raw bytes themselves are not counted);
* the growth of the process's peak RSS (VmHWM, reset just before), in a fresh
  process per shape (the raw bytes were already in memory).

    python bench/bench_message_memory.py [--mb 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import tracemalloc
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email._inbound.pipeline import InboundPipeline  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402


def message(kind: str, size: int) -> bytes:
    rng = random.Random(1)
    msg = EmailMessage()
    msg["From"] = "anna@example.com"
    msg["To"] = "bot@example.test"
    msg["Subject"] = f"big {kind}"
    msg["Message-ID"] = f"<big-{kind}@example.com>"
    line = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\n"
    if kind == "attachment":
        msg.set_content("see the attachment")
        payload = rng.randbytes(size * 3 // 4)
        msg.add_attachment(payload, maintype="application", subtype="pdf", filename="big.pdf")
    elif kind == "text":
        msg.set_content(line * (size // len(line)), cte="8bit")
    else:
        msg.set_content("<p>" + "</p><p>".join([line] * (size // (len(line) + 7))) + "</p>",
                        subtype="html", cte="8bit")  # fmt: skip
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def measure(raw: bytes, config: EmailConfig) -> int:
    pipeline = InboundPipeline(config)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    outcome = await pipeline.process(raw)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert outcome.decision == "deliver", outcome
    return peak


def status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_config(tmp: str) -> EmailConfig:
    return EmailConfig(
        imap_host="127.0.0.1",
        smtp_host="127.0.0.1",
        username="bot",
        password="unused",  # type: ignore[arg-type]
        from_address="bot@example.test",
        allowed_senders=["*"],
        sender_auth="off",
        state_dir=Path(tmp) / "state",
        attachments_dir=Path(tmp) / "att",
        max_message_bytes=200 * 1024 * 1024,
        max_attachment_bytes=100 * 1024 * 1024,
        max_attachments_total_bytes=100 * 1024 * 1024,
    )


def child(kind: str, mb: int) -> None:
    """In a fresh process: the growth of peak RSS while one message is processed."""
    raw = message(kind, mb * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = InboundPipeline(make_config(tmp))
        asyncio.run(pipeline.process(b"From: a@example.com\r\n\r\nwarm up"))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak (VmHWM) to the current RSS (Linux)
        before = status_mb("VmRSS")
        outcome = asyncio.run(pipeline.process(raw))
        assert outcome.decision == "deliver", outcome
        print(json.dumps({"rss": status_mb("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(tmp)
        print(f"{'shape':12s} {'size MB':>8s} {'alloc MB':>9s} {'multiple':>8s}"
              f" {'RSS MB':>8s} {'multiple':>8s}")  # fmt: skip
        for kind in ("attachment", "text", "html"):
            raw = message(kind, args.mb * 1024 * 1024)
            peak = asyncio.run(measure(raw, config))
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(args.mb)],
                capture_output=True,
                check=True,
            )
            rss = json.loads(out.stdout.decode().strip().splitlines()[-1])["rss"] * 2**20
            print(f"{kind:12s} {len(raw) / 2**20:8.1f} {peak / 2**20:9.1f} {peak / len(raw):7.1f}x"
                  f" {rss / 2**20:8.1f} {rss / len(raw):7.1f}x")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
