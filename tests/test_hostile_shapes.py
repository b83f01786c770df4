"""The hostile shapes of issue 23: no single mail may stall the loop or balloon
memory. What can be checked without a clock is checked here: no C-level text step
is handed more than a piece of the body, the stripping budget covers every path,
MIME nesting is refused in any letter case, and a waiting message is stored once,
unescaped. The loop's heartbeat and the peak RSS are measured by
bench/bench_hostile.py (numbers in docs/concepts/security.md, "Work bounds")."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import ChannelMessage, EmailChannel
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._mail import charsets, reply_text
from prx_channel_email._mail.reply_text import StripBudgetExceeded, new_text
from prx_channel_email.config import EmailConfig
from tests.fakes.pipeline import imap_config
from tests.inbound_helpers import inbound_config
from tests.servers.dovecot import Account, DovecotServer


def text_mail(body: str, mid: str = "<shape@example.com>") -> bytes:
    head = (
        f"From: anna@example.com\r\nTo: bot@example.test\r\nSubject: shape\r\n"
        f"Message-ID: {mid}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + body.encode()


class _Spy:
    """A compiled pattern that records how much text each call was handed."""

    def __init__(self, pattern: re.Pattern[str], seen: list[int]) -> None:
        self.pattern, self.seen = pattern, seen

    def sub(self, repl: Any, text: str, *args: Any) -> str:
        self.seen.append(len(text))
        return self.pattern.sub(repl, text, *args)


@pytest.mark.parametrize(
    "body",
    ["\x01" * 3_000_000, "> \n" * 1_000_000, "x" * 3_000_000, "a \t\x01\n" * 600_000],
    ids=["control", "quote-marks", "one-line", "mixed"],
)
async def test_no_regex_pass_over_the_body_is_handed_more_than_a_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    """One ``re.sub`` over 24 MB of ``\\x01`` held the GIL for 2.1 s, on a worker
    thread too (the loop stalled 6 s): each C-level pass now sees one piece."""
    seen: list[int] = []
    monkeypatch.setattr(charsets, "CONTROL_RE", _Spy(charsets.CONTROL_RE, seen))
    monkeypatch.setattr(charsets, "_BLANK_RUN_RE", _Spy(charsets._BLANK_RUN_RE, seen))
    pipeline = InboundPipeline(inbound_config(tmp_path, allowed_senders=["*"],
                                              sender_auth="off"))  # fmt: skip
    outcome = await pipeline.process(text_mail(body))
    assert outcome.decision == "deliver", outcome
    assert seen and max(seen) <= charsets.CHUNK_CHARS


def reference_tidy(text: str) -> str:
    """The rule tidy implements, written plainly (whole text at once)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = charsets.CONTROL_RE.sub("", text).replace("\ufeff", "").replace("\u200b", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def test_tidy_in_pieces_gives_the_whole_text_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seams never split CRLF, never cut a line's trailing blanks short or leave a
    third blank line (pieces of 24 characters make every seam case common)."""
    monkeypatch.setattr(charsets, "CHUNK_CHARS", 24)
    rng = random.Random(23)
    alphabet = ["a", "b", "xyz", " ", "\t", "\xa0", "\n", "\r", "\r\n", "\n\n\n", "\x01",
                "\ufeff", "\u200b"]  # fmt: skip
    long_blank = re.compile("[ \t\r\xa0\x01\ufeff\u200b]{23,}")  # blanks and removables
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.choice([30, 300, 3000])))
        if long_blank.search(text):
            continue  # a blank run longer than a piece may keep some of itself (documented)
        checked += 1
        assert charsets.tidy(text) == reference_tidy(text), repr(text)
    assert checked > 300


def test_the_strip_budget_covers_the_all_quoted_fallback() -> None:
    """15 MB of quoted lines took 3.6 s in a path the 0.25 s budget never checked."""
    quoted = "> an old line, quoted\n" * 50_000
    with pytest.raises(StripBudgetExceeded):
        new_text(quoted, budget=0.0)
    assert new_text(quoted, budget=None)  # with time, still never empty


def test_a_one_line_body_is_stripped_within_its_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head stripping reads ended at the first newline past 100,000 characters:
    a 24 MB single line was read whole, more than once."""
    seen: list[int] = []
    latest = reply_text._latest_reply

    def spy(text: str, deadline: Any) -> str | None:
        seen.append(len(text))
        return latest(text, deadline)

    monkeypatch.setattr(reply_text, "_latest_reply", spy)
    body = ("word " * 600_000).strip()  # as the MIME walk hands it on: tidy
    assert new_text(body, budget=None) == body  # nothing lost
    assert seen and max(seen) <= reply_text.MAX_STRIP_CHARS + reply_text._LINE_REACH


async def test_deep_mime_nesting_in_any_letter_case_is_a_clear_quarantine(
    tmp_path: Path,
) -> None:
    """57 KB of "mUltipart" nesting slipped past a case-sensitive count into the
    recursive parser (0.5 s of CPU, on the event loop)."""
    head = (
        "From: anna@example.com\r\nTo: bot@example.test\r\nSubject: deep\r\n"
        "Message-ID: <deep@example.com>\r\nMIME-Version: 1.0\r\n"
    )
    opening = "".join(
        f'Content-Type: mUltipart/mixed; boundary="b{d}"\r\n\r\n--b{d}\r\n' for d in range(400)
    )
    closing = "".join(f"\r\n--b{d}--\r\n" for d in reversed(range(400)))
    raw = (head + opening + "Content-Type: text/plain\r\n\r\nhi\r\n" + closing).encode()
    pipeline = InboundPipeline(inbound_config(tmp_path, allowed_senders=["*"],
                                              sender_auth="off"))  # fmt: skip
    outcome = await pipeline.process(raw)
    assert (outcome.decision, outcome.reason) == ("quarantine", "mime_too_complex")


@contextlib.asynccontextmanager
async def listening(cfg: EmailConfig) -> AsyncIterator[asyncio.Queue[ChannelMessage]]:
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(cfg) as channel:
        task = asyncio.create_task(channel.listen(queue))
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), 15)
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def state_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_a_waiting_message_is_stored_once_and_unescaped(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """A 24 MB mail of ``"`` added 193 MB to the state database: its content and full
    text, each JSON-escaped to twice its size. In flight it now costs about its size
    (plus the write-ahead log's copy), and it comes back whole after a restart."""
    cfg = imap_config(dovecot, account, tmp_path / "state", sender_auth="off", handoff="ack")
    body = '"\\' * 1_000_000 + "\nsecond line with ünïcode\n"
    async with listening(cfg) as queue:
        before = state_bytes(tmp_path / "state")
        await dovecot.adeliver(account, text_mail(body))
        first = await asyncio.wait_for(queue.get(), 60)
        grown = state_bytes(tmp_path / "state") - before
    assert first.content == first.full_text == body.strip()
    assert grown < 3 * len(body), f"the state grew {grown / len(body):.1f}x the body"
    async with listening(cfg) as queue:  # not acked: handed on again, intact
        again = await asyncio.wait_for(queue.get(), 60)
    assert again.redelivered and again.content == first.content
    assert again.model_dump(exclude={"redelivered"}) == first.model_dump(exclude={"redelivered"})
