"""Peak memory per inbound message stays a small multiple of its size (issues 15, 23).

The benchmarks page (docs/project/benchmarks.md) documents about 4x the message's
size in Python allocations for one big message (a 24 MB one peaked at 8.7x before
the parse was reworked). This guards the multiple with tracemalloc, which counts
allocations, not time, for ordinary shapes and for the hostile ones of issue 23
(a body of control characters, of "> " lines, one endless line, all quoted, all ``"``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
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


# The child stores one big message in flight and one deferred in a fresh SQLite
# state, and prints how far the process's peak RSS rose over the RSS before, per
# byte of the message. RSS, not tracemalloc: SQLite's own copies are invisible to
# tracemalloc, and they were the peak of a big mail's whole path (the bound value
# and the record, each a whole copy, on top of a joined third string).
_STORE_CHILD = """
import asyncio, sys
from pathlib import Path
from prx_channel_email._storage import (
    Deferral, HandoffBatch, InFlight, LedgerEntry, Mailbox, MailKey, open_storage,
)
from prx_channel_email.models import ChannelMessage, pack_message

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

async def main(state, size):
    box = Mailbox("bot@example.test", "INBOX")
    entry = LedgerEntry("<big@x>", "a@x", "a@x", "big", "<big@x>", [], 1000.0)
    async with open_storage(Path(state)) as store:
        await store.commit_handoff(HandoffBatch(box))  # warm: tables, caches
        text = "lorem ipsum, dolor sit amet\\n" * (size // 28)
        message = ChannelMessage(
            id="<big@x>", sender="a@x", reply_target="a@x", subject="big",
            thread_ts="<big@x>", content=text, full_text=text, timestamp=1000.0,
        )
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        await store.commit_handoff(HandoffBatch(box,
            in_flight=[InFlight(MailKey(box.account, "INBOX", 7, 1), entry, pack_message(message))],
            deferrals=[Deferral(MailKey(box.account, "INBOX", 7, 2), entry, 1, "rate_limited",
                                1000.0, pack_message(message))],
        ))
        print((status("VmHWM") - before) / len(text))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_storing_a_big_waiting_message_adds_no_whole_copy_of_it(tmp_path: Path) -> None:
    """Storing a waiting message (in flight, deferred) of 16 MB raises the peak RSS
    by well under its size: it is written in pieces, never joined into one string
    nor bound whole (that was 3 copies, the last step over 5x for a big mail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", _STORE_CHILD, str(tmp_path / "state"), str(16 * 2**20)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    multiple = float(done.stdout.strip().splitlines()[-1])
    assert multiple < 1.0, f"storing it raised the peak RSS by {multiple:.2f}x its size"
