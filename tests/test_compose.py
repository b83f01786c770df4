"""compose(): what the recipient's mail client will see in a reply."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from prx_channel_email._mail.message_ids import is_minted, parse_id_list
from prx_channel_email._outbound.compose import (
    MAX_REFERENCES,
    Parent,
    compose,
    render_html,
    reply_subject,
    thread_references,
)
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ConfigError, SendError
from tests.config_builder import build_config
from tests.outbound_helpers import parse


def cfg(tmp_path: Path, **kw: object) -> EmailConfig:
    fields: dict[str, object] = {
        "username": "bot",
        "password": "pw",
        "from_address": "bot@bots.example",
    }
    fields.update(kw)
    return build_config(tmp_path, **fields)


PARENT = Parent(
    message_id="<p2@people.example>",
    subject="Lunch?",
    references=["<p0@people.example>", "<p1@people.example>"],
)


def test_reply_headers(tmp_path: Path) -> None:
    out = compose(
        cfg(tmp_path, from_name="Help Bot"),
        content="Sure, *noon*.",
        recipient="ann@people.example",
        parent=PARENT,
        now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    msg = parse(out.raw)
    assert msg["In-Reply-To"] == "<p2@people.example>"
    assert parse_id_list(msg["References"]) == [
        "<p0@people.example>",
        "<p1@people.example>",
        "<p2@people.example>",
    ]
    assert msg["Subject"] == "Re: Lunch?"
    assert msg["To"] == "ann@people.example"
    assert msg["From"] == "Help Bot <bot@bots.example>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert msg["Message-ID"] == out.message_id
    assert out.message_id.endswith("@bots.example>") and is_minted(out.message_id)
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and plain.get_content().strip() == "Sure, *noon*."
    assert html is not None and "<em>noon</em>" in html.get_content()
    assert b"\r\n" in out.raw and b"\n" not in out.raw.replace(b"\r\n", b"")


def test_new_conversation_uses_default_subject(tmp_path: Path) -> None:
    out = compose(
        cfg(tmp_path, default_subject="From your bot"), content="hi", recipient="x@y.example"
    )
    msg = parse(out.raw)
    assert msg["Subject"] == "From your bot"
    assert msg["In-Reply-To"] is None and msg["References"] is None
    # Not a reply, but still machine-sent: other robots must not answer it either.
    assert msg["Auto-Submitted"] == "auto-generated"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Lunch?", "Re: Lunch?"),
        ("Re: Lunch?", "Re: Lunch?"),
        ("RE: re: Re: Lunch?", "Re: Lunch?"),
        ("AW: SV: Antw: Lunch?", "Re: Lunch?"),
        ("Re[3]: Lunch?", "Re: Lunch?"),
        ("Fwd: Lunch?", "Re: Fwd: Lunch?"),
        ("Regarding lunch", "Re: Regarding lunch"),
    ],
)
def test_reply_subject_does_not_stack(subject: str, expected: str) -> None:
    assert reply_subject(subject) == expected


def test_unicode_subject_and_name_use_encoded_words(tmp_path: Path) -> None:
    parent = Parent("<p@x.example>", "Grüße aus Köln ☕", [])
    out = compose(
        cfg(tmp_path, from_name="Bøt"),
        content="Danke — gern!",
        recipient="a@x.example",
        parent=parent,
    )
    head = out.raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # 7-bit headers: every non-ASCII character is an encoded word
    assert b"=?utf-8?" in head
    msg = parse(out.raw)
    assert msg["Subject"] == "Re: Grüße aus Köln ☕"
    assert msg["From"].addresses[0].display_name == "Bøt"
    plain = msg.get_body(("plain",))
    assert plain is not None and "Danke — gern!" in plain.get_content()


def test_long_reference_chain_keeps_first_and_latest() -> None:
    refs = [f"<r{i}@x.example>" for i in range(50)]
    parent = Parent("<last@x.example>", "s", refs)
    out = thread_references(parent)
    assert len(out) == MAX_REFERENCES
    assert out[0] == "<r0@x.example>"
    assert out[-1] == "<last@x.example>"
    assert out[-2] == "<r49@x.example>"


def test_long_ids_stay_intact_when_folded(tmp_path: Path) -> None:
    """A long id must not turn into an RFC 2047 encoded word (that breaks threading)."""
    long_id = "<CAF=+" + "x" * 90 + "@mail.gmail.example>"
    parent = Parent(long_id, "s", [f"<{i}.{'y' * 40}@x.example>" for i in range(5)])
    out = compose(cfg(tmp_path), content="c", recipient="a@x.example", parent=parent)
    head = out.raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head.split(b"\r\nReferences:")[1].split(b"\r\nAuto-")[0]
    msg = parse(out.raw)
    assert msg["In-Reply-To"] == long_id
    assert parse_id_list(msg["References"])[-1] == long_id
    assert len(parse_id_list(msg["References"])) == 6


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("subject", {"subject": "hi\r\nBcc: victim@x.example"}),
        ("subject", {"subject": "hi\nBcc: victim@x.example"}),
        ("subject", {"subject": "hi\x00there"}),
        ("recipient", {"recipient": "a@x.example\r\nBcc: victim@x.example"}),
        ("recipient", {"recipient": "a@x.example\nX-Evil: 1"}),
    ],
)
def test_header_injection_is_rejected(tmp_path: Path, field: str, kwargs: dict[str, str]) -> None:
    args: dict[str, str] = {"content": "c", "recipient": "a@x.example", **kwargs}
    with pytest.raises(SendError) as info:
        compose(cfg(tmp_path), **args)  # type: ignore[arg-type]
    assert info.value.code == "header_injection"
    assert field in str(info.value)


def test_display_name_injection_is_rejected(tmp_path: Path) -> None:
    injected = "Bot\r\nBcc: v@x.example"
    with pytest.raises(ConfigError, match="line breaks"):  # refused when the config loads
        cfg(tmp_path, from_name=injected)
    # ... and by compose itself, for a config built without validation.
    unchecked = cfg(tmp_path).model_copy(update={"from_name": injected})
    with pytest.raises(SendError) as info:
        compose(unchecked, content="c", recipient="a@x.example")
    assert info.value.code == "header_injection"


@pytest.mark.parametrize("bad", ["not an address", "a@", "@x.example", "a b@x.example", ""])
def test_invalid_recipient_is_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SendError) as info:
        compose(cfg(tmp_path), content="c", recipient=bad)
    assert info.value.code == "bad_recipient"


def test_raw_html_in_markdown_is_escaped(tmp_path: Path) -> None:
    out = compose(
        cfg(tmp_path),
        content=(
            "Look: <script>alert('x')</script>\n\n<img src=x onerror=alert(1)>"
            "\n\n[a](javascript:alert(1))"
        ),
        recipient="a@x.example",
    )
    html = parse(out.raw).get_body(("html",))
    assert html is not None
    text = html.get_content()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<img" not in text
    assert 'href="javascript:' not in text


def test_markdown_renders() -> None:
    html = render_html("# Title\n\n- one\n- **two**\n\n`code`")
    assert (
        "<h1>Title</h1>" in html and "<strong>two</strong>" in html and "<code>code</code>" in html
    )


def test_attachments(tmp_path: Path) -> None:
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    out = compose(cfg(tmp_path), content="see file", recipient="a@x.example", attachments=[report])
    msg = parse(out.raw)
    assert msg.get_content_type() == "multipart/mixed"
    files = list(msg.iter_attachments())
    assert [(f.get_filename(), f.get_content_type()) for f in files] == [("report.csv", "text/csv")]
    assert files[0].get_content() in (b"a,b\n1,2\n", "a,b\n1,2\n")
    assert msg.get_body(("html",)) is not None


def test_attachment_too_large_or_missing(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(SendError) as info:
        compose(
            cfg(tmp_path, max_outbound_attachment_bytes=1024),
            content="c",
            recipient="a@x.example",
            attachments=[big],
        )
    assert info.value.code == "attachment_too_large"
    with pytest.raises(SendError) as info:
        compose(
            cfg(tmp_path), content="c", recipient="a@x.example", attachments=[tmp_path / "nope.pdf"]
        )
    assert info.value.code == "attachment_unreadable"


def test_long_subject_is_folded_and_reads_back_unchanged(tmp_path: Path) -> None:
    subject = "Quarterly  numbers for the north-east region " * 6 + "final"
    out = compose(cfg(tmp_path), content="c", recipient="a@x.example", subject=subject)
    head = out.raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert all(line.strip() for line in head.split(b"\r\n"))
    assert parse(out.raw)["Subject"] == subject


def test_non_ascii_attachment_name_survives(tmp_path: Path) -> None:
    name = 'Bericht "Q3" für Jürgen.pdf'
    path = tmp_path / name
    path.write_bytes(b"%PDF-1.4 fake")
    out = compose(cfg(tmp_path), content="anbei", recipient="a@x.example", attachments=[path])
    assert out.raw.split(b"\r\n\r\n", 1)[0].isascii()
    [part] = list(parse(out.raw).iter_attachments())
    assert part.get_filename() == name
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == b"%PDF-1.4 fake"


def test_an_overlong_message_id_is_left_out_instead_of_breaking_the_reply(
    tmp_path: Path,
) -> None:
    """A header line over 998 characters makes servers refuse the whole message."""
    huge = "<" + "x" * 1500 + "@people.example>"
    parent = Parent(
        message_id=huge,
        subject="Long",
        references=["<p0@people.example>", huge],
    )
    out = compose(cfg(tmp_path), content="ok", recipient="ann@people.example", parent=parent)
    assert all(len(line) <= 998 for line in out.raw.split(b"\r\n"))
    assert parse(out.raw)["Subject"] == "Re: Long"
    # A parent whose own id is usable still threads, without the overlong reference.
    parent2 = Parent("<p2@people.example>", "Long", ["<p0@people.example>", huge])
    msg = parse(compose(cfg(tmp_path), content="ok", recipient="a@p.example", parent=parent2).raw)
    assert parse_id_list(msg["References"]) == ["<p0@people.example>", "<p2@people.example>"]


@pytest.mark.parametrize(
    "recipient",
    ["ann@people.example, evil@attacker.example", "a\x01nn@people.example", "ann"],
)
def test_recipient_must_be_exactly_one_address_as_written(tmp_path: Path, recipient: str) -> None:
    with pytest.raises(SendError) as info:
        compose(cfg(tmp_path), content="hi", recipient=recipient)
    assert info.value.code == "bad_recipient"


def test_display_name_with_comma_is_one_recipient(tmp_path: Path) -> None:
    out = compose(cfg(tmp_path), content="hi", recipient='"Doe, Jane" <jane@people.example>')
    assert out.recipient == "jane@people.example"


def test_lone_surrogate_is_a_send_error_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(SendError) as info:
        compose(cfg(tmp_path), content="truncated \ud83d", recipient="ann@people.example")
    assert info.value.code == "bad_input"


def test_control_characters_of_the_parent_subject_are_not_copied(tmp_path: Path) -> None:
    parent = Parent("<p2@people.example>", "Lun\x00ch\x1b[31m?", [])
    out = compose(cfg(tmp_path), content="ok", recipient="ann@people.example", parent=parent)
    assert parse(out.raw)["Subject"] == "Re: Lunch[31m?"
