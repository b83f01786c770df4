"""Normalization: the corpus of real-client messages, and the decoding rules one by one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailparser_reply.parser import EmailMessage

from prx_channel_email._inbound import pipeline as inbound
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._mail import headers as header_block
from prx_channel_email._mail import reply_text
from prx_channel_email._mail.charsets import decode_bytes, decode_words
from prx_channel_email._mail.envelope import envelope, parse_timestamp
from prx_channel_email._mail.headers import (
    MAX_FIELD_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_SCAN,
    Headers,
    cap_header_block,
    split_header_block,
)
from prx_channel_email._mail.html_text import html_to_text
from prx_channel_email._mail.message_ids import synthetic_message_id
from prx_channel_email._mail.reply_headers import find_reply_header
from prx_channel_email._mail.reply_text import new_text
from prx_channel_email.config import EmailConfig
from tests.inbound_helpers import (
    ARRIVAL,
    corpus_expected,
    corpus_names,
    corpus_raw,
    inbound_config,
    outcome_fields,
)


@pytest.mark.parametrize("name", corpus_names())
async def test_corpus_message_normalizes_to_expected_fields(name: str, tmp_path: Path) -> None:
    pipeline = InboundPipeline(inbound_config(tmp_path), clock=lambda: ARRIVAL)
    outcome = await pipeline.process(corpus_raw(name), arrival=ARRIVAL)
    assert outcome_fields(outcome) == corpus_expected(name)


def test_corpus_covers_the_required_kinds() -> None:
    names = set(corpus_names())
    required = {
        "gmail_reply",
        "outlook_en_reply",
        "outlook_de_reply",
        "apple_mail_reply",
        "quoted_inline",
        "html_newsletter",
        "windows1252",
        "iso2022jp",
        "koi8r",
        "mislabelled",
        "forwarded",
        "hostile_attachments",
        "auto_submitted",
        "bounce",
        "list_mail",
        "forged_auth",
    }
    assert required <= names
    for name in names:
        assert corpus_expected(name)["decision"] in ("deliver", "reject", "quarantine")


async def test_reply_strips_history_but_full_text_keeps_it(tmp_path: Path) -> None:
    pipeline = InboundPipeline(inbound_config(tmp_path))
    outcome = await pipeline.process(corpus_raw("gmail_reply"), arrival=ARRIVAL)
    assert outcome.message is not None
    assert "wrote:" not in outcome.message.content
    assert "Here are the Q3 figures" not in outcome.message.content
    assert "Here are the Q3 figures" in outcome.message.full_text


def test_html_only_mail_becomes_readable_text() -> None:
    html = (
        "<html><head><style>p { color: red }</style><script>alert('x')</script></head>"
        "<body><p>Fish &amp; chips&nbsp;&euro;5</p><p>one<br>two</p>"
        '<a href="https://example.com/a">the offer</a></body></html>'
    )
    text = html_to_text(html)
    assert text == "Fish & chips €5\n\none\ntwo\n\nthe offer (https://example.com/a)"


def test_link_whose_text_is_its_url_is_not_repeated() -> None:
    assert html_to_text('<a href="https://x.example/">https://x.example/</a>') == (
        "https://x.example/"
    )


@pytest.mark.parametrize(
    ("data", "label", "expected"),
    [
        ("naïve".encode("cp1252"), "utf-8", "naïve"),  # labelled UTF-8, written in 1252
        ("Grüße".encode(), "x-no-such-charset", "Grüße"),  # unknown label
        ("“quoted”".encode("cp1252"), "iso-8859-1", "“quoted”"),  # latin-1 label, 1252 bytes
        ("Привет".encode("koi8_r"), "KOI8-R", "Привет"),
        ("日本語".encode("iso2022_jp"), "iso-2022-jp", "日本語"),
        (b"plain\x00text", "us-ascii", "plaintext"),
        (b"\x81\x8d\xff", "utf-8", "\ufffd\ufffd\ufffd"),  # undecodable anywhere: no raise
    ],
)
def test_decode_bytes_falls_back_for_wrong_labels(data: bytes, label: str, expected: str) -> None:
    assert decode_bytes(data, label) == expected


def test_encoded_words_in_headers_are_decoded() -> None:
    assert decode_words("=?utf-8?B?w5xiZXI=?= =?utf-8?Q?_alles?=") == "Über alles"
    assert decode_words("=?bogus-cs?Q?caf=C3=A9?=") == "café"
    assert decode_words("=?utf-8?B?!!!notbase64?=") != ""


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("Tue, 1 Oct 2024 10:00:00 +0200", 1727769600),
        ("Tue, 1 Oct 2024 01:00:00 -0700", 1727769600),
        ("Tue, 1 Oct 2024 08:00:00 GMT", 1727769600),
        ("Tue, 1 Oct 2024 08:00:00 -0000", 1727769600),
        ("not a date", int(ARRIVAL)),
        ("Tue, 1 Oct 99999 08:00:00 +0000", int(ARRIVAL)),
        (None, int(ARRIVAL)),
    ],
)
def test_date_header_time_zone_is_honoured(date: str | None, expected: int) -> None:
    assert parse_timestamp(date, ARRIVAL) == expected


def test_missing_message_id_is_stable_for_the_same_bytes() -> None:
    raw = b"From: a@example.com\r\n\r\nhello\r\n"
    block, _ = split_header_block(raw)
    first = envelope(Headers.from_block(block), raw, ARRIVAL)
    second = envelope(Headers.from_block(block), raw, ARRIVAL + 50)
    assert first.message_id == second.message_id == synthetic_message_id(raw)
    other = envelope(Headers.from_block(block), raw + b"!", ARRIVAL)
    assert other.message_id != first.message_id


def test_thread_ts_prefers_first_reference_then_in_reply_to() -> None:
    def thread(block: bytes) -> str:
        return envelope(Headers.from_block(block), block, ARRIVAL).thread_ts

    assert thread(
        b"Message-ID: <m@x>\r\nReferences: <a@x>\r\n <b@x>\r\nIn-Reply-To: <b@x>\r\n"
    ) == ("<a@x>")
    assert thread(b"Message-ID: <m@x>\r\nIn-Reply-To: <b@x>\r\n") == "<b@x>"
    assert thread(b"Message-ID: <m@x>\r\n") == "<m@x>"


def test_giant_encoded_subject_is_capped_and_fast() -> None:
    word = b"=?utf-8?q?=C3=A4?= "
    block = b"From: a@example.com\r\nSubject: " + word * 30_000 + b"\r\nMessage-ID: <g@x>\r\n"
    capped = cap_header_block(block)
    assert len(capped) <= MAX_HEADER_BYTES
    headers = Headers.from_block(block)
    subject = headers.text("subject")
    assert subject.startswith("ää") and len(subject) < MAX_FIELD_BYTES
    assert headers.get("message-id") == "<g@x>"


def test_header_block_over_budget_keeps_essential_fields() -> None:
    noise = b"".join(b"X-Noise-%d: %s\r\n" % (i, b"n" * 200) for i in range(600))
    block = noise + b"From: a@example.com\r\nAuto-Submitted: auto-replied\r\n"
    headers = Headers.from_block(block)
    assert headers.get("from") == "a@example.com"
    assert headers.get("auto-submitted") == "auto-replied"
    assert headers.get("x-noise-599") is None


def test_new_text_is_never_empty_when_there_was_text() -> None:
    only_quote = "> all of this\n> is quoted"
    assert new_text(only_quote) != ""
    only_signature = "-- \nAnna Example\nACME"
    assert new_text(only_signature) != ""
    assert new_text("   \n ") == ""


def test_outlook_german_header_block_is_cut() -> None:
    text = (
        "Passt.\n\nVon: Bot <bot@example.net>\nGesendet: Montag, 7. Oktober 2024 10:00\n"
        "An: Anna <anna@example.de>\nBetreff: Frage\n\nAlte Frage"
    )
    assert new_text(text) == "Passt."


async def test_big_message_is_parsed_on_a_worker_thread(tmp_path: Path) -> None:
    body = ("line of text\r\n" * 220_000).encode()
    raw = b"From: a@example.com\r\nMessage-ID: <big@x>\r\nSubject: big\r\n\r\n" + body
    loop_thread = threading.get_ident()
    seen: list[int] = []
    real = inbound.analyze_body

    def spy(data: bytes, config: EmailConfig, *rest: Any) -> Any:
        seen.append(threading.get_ident())
        return real(data, config, *rest)

    pipeline = InboundPipeline(inbound_config(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inbound, "analyze_body", spy)
        outcome = await pipeline.process(raw, arrival=ARRIVAL)
    assert outcome.message is not None
    assert outcome.message.full_text.count("line of text") == 220_000
    assert seen and seen[0] != loop_thread


async def test_header_reading_of_big_mail_runs_on_a_worker_thread(tmp_path: Path) -> None:
    # Megabytes of one-byte header lines (the reviewer's 3.4 s stall): reading the
    # header block of big mail must not happen on the event loop either.
    raw = b"From: mallory@evil.example\r\nMessage-ID: <x@y>\r\n" + b"X:\r\n" * 600_000
    loop_thread = threading.get_ident()
    seen: list[int] = []
    real = inbound.envelope

    def spy(*args: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args)

    pipeline = InboundPipeline(inbound_config(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inbound, "envelope", spy)
        outcome = await pipeline.process(raw + b"\r\nbody\r\n", arrival=ARRIVAL)
        oversized = await pipeline.process_oversized(raw + b"\r\n", 50_000_000, arrival=ARRIVAL)
        small = await pipeline.process(raw[:2000] + b"\r\n\r\nbody\r\n", arrival=ARRIVAL)
    assert [o.reason for o in (outcome, oversized, small)] == ["not_allowed"] * 3
    assert len(seen) == 3
    assert seen[0] != loop_thread and seen[1] != loop_thread
    assert seen[2] == loop_thread  # small mail stays inline


def test_header_block_is_split_into_fields_only_up_to_the_scan_limit() -> None:
    block = b"From: a@example.com\r\n" + b"X:\r\n" * (MAX_HEADER_SCAN // 2)
    late = block + b"Auto-Submitted: auto-replied\r\n"
    scanned: list[int] = []
    real = header_block._fields

    def spy(data: bytes) -> Any:
        scanned.append(len(data))
        return real(data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(header_block, "_fields", spy)
        headers = Headers.from_block(late)
    assert scanned and max(scanned) <= MAX_HEADER_SCAN
    assert headers.get("from") == "a@example.com"
    assert headers.get("auto-submitted") is None  # beyond the limit: never read


def _sender(block: bytes) -> tuple[str, str | None]:
    env = envelope(Headers.from_block(block), block, ARRIVAL)
    return env.sender, env.sender_problem


def test_capping_never_changes_whose_mail_it_is() -> None:
    # Cut at 8 KB, 'alice@victim.example <padding> <eve@evil.example>' read as alice's.
    padded = b"From: alice@victim.example" + b" " * MAX_FIELD_BYTES + b"<eve@evil.example>\r\n"
    assert _sender(padded + b"Subject: x\r\n") == ("", "no_sender")
    # A second From pushed beyond the header budget, or beyond the scan limit.
    refs = b"".join(b"References: <%d@x> %s\r\n" % (i, b"r" * 7000) for i in range(25))
    second = b"From: eve@evil.example\r\n"
    first = b"From: alice@victim.example\r\n"
    assert _sender(first + refs + second) == ("", "ambiguous_sender")
    junk = b"X:\r\n" * (MAX_HEADER_SCAN // 4)
    assert _sender(first + junk + second) == ("", "ambiguous_sender")
    assert _sender(b"Subject: a\r\n" + junk + second) == ("", "no_sender")
    assert _sender(first + junk + b"Subject: b\r\n") == ("alice@victim.example", None)
    # An oversized topmost Authentication-Results is not read as a shorter verdict.
    verdict = b"Authentication-Results: mx.example.net; dkim=pass header.d=victim.example"
    ar = verdict + b" " * MAX_FIELD_BYTES + b"; dmarc=fail header.from=victim.example\r\n"
    headers = Headers.from_block(ar + first)
    assert headers.get_all("authentication-results") == [""]


def _reference_cut_signature(text: str) -> str | None:
    """The earlier (quadratic) rule, which the windowed one must match exactly."""
    cut: int | None = None
    marker = reply_text._SIGNATURE_START_RE.search(text)
    if marker is not None and text[: marker.start()].strip():
        cut = marker.start()
    for closing in reply_text._CLOSING_RE.finditer(text, 0, cut if cut is not None else len(text)):
        tail = text[closing.end() : cut].strip().splitlines()
        if (
            text[: closing.start()].strip()
            and 1 <= len(tail) <= 6
            and all(len(line) <= 72 for line in tail)
        ):
            cut = closing.start()
            break
    return text[:cut].rstrip() if cut is not None else None


class _ScanRecorder:
    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.spans: list[int] = []

    def finditer(self, text: str, pos: int = 0, endpos: int = 2**62) -> Any:
        self.spans.append(min(endpos, len(text)) - pos)
        return self.pattern.finditer(text, pos, endpos)


def test_closing_salutation_scan_is_bounded_to_the_tail() -> None:
    # The reviewer's 5 s stall: 250 KB of "LG\nx" lines (every line pair a candidate).
    text = "Hello\n" + "LG\nx\n" * 36_000
    recorder = _ScanRecorder(reply_text._CLOSING_RE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reply_text, "_CLOSING_RE", recorder)
        got = reply_text._cut_signature(text)
    assert recorder.spans and max(recorder.spans) < 100
    # The topmost salutation followed by at most 6 lines: the third "LG" from the end.
    assert got == ("Hello\n" + "LG\nx\n" * 35_997).rstrip()
    # Blank lines between the salutation and the name still count as before.
    spaced = "Hi,\nsee below.\n\nThanks," + "\n" * 500 + "Bob\nExample Corp"
    assert reply_text._cut_signature(spaced) == "Hi,\nsee below."


_SIGNATURE_LINES = ["Thanks,", "LG", "Best regards", "Bob", "", "  ", "x" * 80, "words here"]
_SIGNATURE_LINES += ["-- ", "Sent from my phone", "> Cheers", "\u2028", "Grüße", " Tom", "\t"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_SIGNATURE_LINES), max_size=16), st.sampled_from(["", "\n\n"]))
def test_windowed_signature_cut_matches_the_reference(lines: list[str], end: str) -> None:
    text = "\n".join(lines) + end
    assert reply_text._cut_signature(text) == _reference_cut_signature(text)


_FRAGMENTS = [
    "On Mon, 1 Oct 2024 at 10:00, Bob <b@x.example> wrote:",
    "Am 1. Oktober 2024 um 10:00 schrieb Bob <b@x.example>:",
    "-----Original Message-----",
    "From: Bob",
    "Sent: Monday",
    "To: Anna",
    "Subject: x",
    "Von: Bob",
    "Gesendet: Montag",
    "An: Anna",
    "Betreff: x",
    "Datum: heute",
    "Cc: c",
    "> quoted",
    "plain words",
    "",
    "*From:* Bob",
]


# mail-parser-reply's English and German patterns (what stripping used before its
# own linear scan): wherever they see a reply header, the scan sees one too, at
# the same line or above it.
_REFERENCE = EmailMessage(text="", languages=["en", "de"]).HEADER_REGEX


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_FRAGMENTS), st.sampled_from(["lower", "upper", "keep"])),
        max_size=8,
    )
)
def test_reply_header_scan_never_skips_a_real_header(parts: list[tuple[str, str]]) -> None:
    text = "\n".join(getattr(p, case)() if case != "keep" else p for p, case in parts)
    lines = [line.strip() for line in text.split("\n")]
    reference = _REFERENCE.search("\n".join(lines))
    if reference:
        start = reference.start() + (reference.group().startswith("\n"))
        found = find_reply_header(lines)
        assert found is not None and found <= "\n".join(lines)[:start].count("\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A bulleted list is the message, not a signature (the reply library's rule
        # cut everything from the first "- " line on).
        (
            "Please do this:\n- buy milk\n- call Bob\n\nand tell me.\n\nThanks,\nAlice",
            "Please do this:\n- buy milk\n- call Bob\n\nand tell me.",
        ),
        ("It is cold:\n-5 degrees today", "It is cold:\n-5 degrees today"),
        # A closing word that starts a sentence of content is kept.
        (
            "Thanks, but point two is wrong: the report is due on Friday, not on Monday.\n"
            "Please fix it before the board meeting.",
            "Thanks, but point two is wrong: the report is due on Friday, not on Monday.\n"
            "Please fix it before the board meeting.",
        ),
        ("Sure thing.\n\n-- \nAlice Example\nCEO, Example Corp", "Sure thing."),
        ("Sure thing.\n\nSent from my iPhone", "Sure thing."),
        ("Passt.\n\nViele Grüße\nJörg Müller\nTel. 0221 123456", "Passt."),
    ],
)
def test_signature_rule_cuts_signatures_and_keeps_content(text: str, expected: str) -> None:
    assert new_text(text) == expected


async def test_stripping_out_of_time_keeps_the_whole_text_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = InboundPipeline(inbound_config(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inbound, "STRIP_BUDGET_SECS", -1.0)  # already spent
        outcome = await pipeline.process(corpus_raw("gmail_reply"), arrival=ARRIVAL)
    assert outcome.message is not None
    assert outcome.message.content == outcome.message.full_text
    assert "wrote:" in outcome.message.content
    assert pipeline.metrics.get("inbound.strip_budget_exceeded") == 1
    assert any("inbound.strip_budget_exceeded" in r.getMessage() for r in caplog.records)


def test_control_characters_never_reach_header_values() -> None:
    block = (
        b"From: =?utf-8?q?Al=0Bi=1Cce=C2=85?= <alice@example.com>\r\n"
        b"Subject: a\x0bb\x0cc\x1cd =?utf-8?q?x=0By=1Cz=C2=85w=E2=80=A8v=E2=80=AEu?=\r\n"
        b"Message-ID: <ctl@example.com>\r\n"
    )
    env = envelope(Headers.from_block(block), block, ARRIVAL)
    controls = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {" "}
    controls |= {"\u2028", "\u2029", "\u202e"}
    for value in (env.subject, env.sender_display or ""):
        assert not controls & set(value), repr(value)
    assert env.sender_display == "Alice"
    assert env.subject.replace(" ", "") == "abcdxyzwvu"
