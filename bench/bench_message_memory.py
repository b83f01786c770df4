"""Peak memory of the inbound pipeline for one big message, as a multiple of its size.

Python allocations (tracemalloc) while ``InboundPipeline.process`` handles one
message, minus what was allocated before (the raw bytes themselves are not
counted), for three shapes of a message of the given size: one big base64
attachment, one big text/plain body, one big HTML body.

    python bench/bench_message_memory.py [--mb 24]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import tracemalloc
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email.config import EmailConfig  # noqa: E402
from prx_channel_email.inbound import InboundPipeline  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = EmailConfig(
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
        print(f"{'shape':12s} {'size MB':>8s} {'peak MB':>8s} {'multiple':>8s}")
        for kind in ("attachment", "text", "html"):
            raw = message(kind, args.mb * 1024 * 1024)
            peak = asyncio.run(measure(raw, config))
            print(f"{kind:12s} {len(raw) / 2**20:8.1f} {peak / 2**20:8.1f} {peak / len(raw):8.1f}x")


if __name__ == "__main__":
    main()
