"""Peak memory per inbound message stays a small multiple of its size (issues 15, 23).

The benchmarks page (docs/project/benchmarks.md) documents about 4x the message's
size in Python allocations for one big message (a 24 MB one peaked at 8.7x before
the parse was reworked). This guards the multiple with tracemalloc, which counts
allocations, not time, for ordinary shapes and for the hostile ones of issue 23
(a body of control characters, of "> " lines, one endless line, all quoted, all ``"``).
"""

from __future__ import annotations

import random
import tracemalloc
from email.message import EmailMessage
from pathlib import Path

import pytest

from prx_channel_email._inbound.pipeline import InboundPipeline
from tests.inbound_helpers import inbound_config

SIZE = 8 * 1024 * 1024
MAX_MULTIPLE = 5.0
LINE = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\n"
QUOTED = "> an old line, quoted\n"
HOSTILE = {
    "control": "\x01" * SIZE,
    "quote-marks": "> \n" * (SIZE // 4),
    "one-line": "x" * SIZE,
    "all-quoted": QUOTED * (SIZE // len(QUOTED)),
    "double-quotes": '"' * SIZE,
}


def big_message(kind: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "anna@example.com"
    msg["To"] = "bot@example.test"
    msg["Subject"] = f"big {kind}"
    msg["Message-ID"] = f"<big-{kind}@example.com>"
    if kind == "attachment":
        msg.set_content("see the attachment")
        payload = random.Random(1).randbytes(SIZE * 3 // 4)
        msg.add_attachment(payload, maintype="application", subtype="pdf", filename="big.pdf")
    elif kind == "text":
        msg.set_content(LINE * (SIZE // len(LINE)), cte="8bit")
    elif kind in HOSTILE:
        msg.set_content(HOSTILE[kind], cte="8bit")
    else:
        body = "<p>" + "</p><p>".join([LINE] * (SIZE // (len(LINE) + 7))) + "</p>"
        msg.set_content(body, subtype="html", cte="8bit")
    return msg.as_bytes().replace(b"\n", b"\r\n")


@pytest.mark.parametrize("kind", ["attachment", "text", "html", *HOSTILE])
async def test_one_big_message_peaks_at_a_small_multiple_of_its_size(
    kind: str, tmp_path: Path
) -> None:
    raw = big_message(kind)
    config = inbound_config(
        tmp_path,
        allowed_senders=["*"],
        sender_auth="off",
        max_message_bytes=64 * SIZE,
        max_attachment_bytes=16 * SIZE,
        max_attachments_total_bytes=16 * SIZE,
    )
    pipeline = InboundPipeline(config)
    await pipeline.process(b"From: a@example.com\r\n\r\nwarm up")  # lazy imports, caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        outcome = await pipeline.process(raw)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert outcome.decision == "deliver", outcome
    assert outcome.message is not None
    assert outcome.message.content or kind == "control"  # nothing but control characters
    multiple = peak / len(raw)
    assert multiple < MAX_MULTIPLE, f"{kind}: peak {multiple:.1f}x the message size"
