"""The MIME body walk: the text (plain preferred over HTML) and the attachments.

The MIME tree is bounded before any parser sees it: the standard library's MIME
parser recurses once per nesting level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message

import mailparser

from .charsets import decode_bytes, decode_words, tidy
from .headers import Headers, cap_header_block, split_header_block
from .html_text import html_to_text

MAX_MULTIPARTS = 100  # multipart containers in one message (nesting and fan-out)
MAX_BOUNDARY_LINES = 2000  # lines starting with "--": an upper bound on the part count
MAX_DEPTH = 40  # how deep the text walk follows nested parts
MAX_HTML_CHARS = 2_000_000  # HTML beyond this is cut before rendering


class TooComplex(ValueError):
    """The MIME structure is beyond what the parser may safely be given."""


def check_structure(body: bytes) -> None:
    """Refuse bodies whose MIME tree is too big to hand to a recursive parser.

    Counts are upper bounds found at C speed: lines starting with "--" (every
    part needs one), then, only when there are many of those, the "multipart/"
    declarations. Ordinary mail is far below both.
    """
    lines = body.count(b"\n--")
    if lines > MAX_BOUNDARY_LINES:
        raise TooComplex(f"more than {MAX_BOUNDARY_LINES} MIME boundary lines")
    # Other spellings ("mUltipart") slip past this count, but not past mail-parser's
    # own recursion guard, which the pipeline turns into a quarantine.
    if lines > MAX_MULTIPARTS and (
        body.count(b"multipart/") + body.count(b"Multipart/") + body.count(b"MULTIPART/")
        > MAX_MULTIPARTS
    ):
        raise TooComplex(f"more than {MAX_MULTIPARTS} nested or sibling multiparts")


@dataclass(frozen=True)
class RawAttachment:
    """An attachment as found in the MIME tree, before the saving policy looks at it."""

    filename: str | None
    content_type: str
    data: bytes


@dataclass
class Body:
    full_text: str = ""
    attachments: list[RawAttachment] = field(default_factory=list)


def parse_message(raw: bytes, split: tuple[bytes, bytes] | None = None) -> Message:
    """Cap the header block and the MIME tree, then parse with mail-parser.

    ``split`` is ``split_header_block(raw)`` when the caller already has it.
    Raises TooComplex for a MIME tree that must not be parsed at all.
    """
    block, body = split or split_header_block(raw)
    check_structure(body)
    capped = cap_header_block(block)
    parsed = mailparser.parse_from_bytes(raw if capped is block else capped + body)
    msg = parsed.message
    if not isinstance(msg, Message):
        raise TooComplex("mail-parser returned no message")
    return msg


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _part_text(part: Message) -> str:
    data = _payload(part)
    try:
        label = part.get_content_charset()
    except Exception:
        label = None
    return decode_bytes(data, label)


def _disposition(part: Message) -> str:
    try:
        return (part.get_content_disposition() or "").lower()
    except Exception:
        return ""


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if name is None:
        try:
            name = part.get_param("name")  # type: ignore[assignment]
        except Exception:
            name = None
        if not isinstance(name, str):
            return None
    return decode_words(name) or None


def _is_attachment(part: Message, ctype: str) -> bool:
    disposition = _disposition(part)
    return disposition == "attachment" or ctype not in ("text/plain", "text/html")


def _forward_header(inner: Message) -> str:
    heads = Headers.of_message(inner)
    lines = ["---------- Forwarded message ----------"]
    for name in ("from", "date", "subject", "to"):
        value = heads.text(name)
        if value:
            lines.append(f"{name.capitalize()}: {value}")
    return "\n".join(lines)


class _Walker:
    """Collects the text (plain preferred over HTML) and the attachments of a MIME tree."""

    def __init__(self) -> None:
        self.attachments: list[RawAttachment] = []

    def text(self, part: Message, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            return ""
        ctype = part.get_content_type().lower()
        if part.is_multipart() or ctype == "message/rfc822":
            children = part.get_payload()
            if not isinstance(children, list):
                return ""
            kids = [c for c in children if isinstance(c, Message)]
            if ctype == "message/rfc822":
                inner = kids[0] if kids else None
                if inner is None:
                    return ""
                return _forward_header(inner) + "\n\n" + self.text(inner, depth + 1)
            if ctype == "multipart/alternative":
                return self._alternative(kids, depth)
            texts = [self.text(k, depth + 1) for k in kids]
            return "\n\n".join(t for t in texts if t.strip())
        if _is_attachment(part, ctype):
            self.attachments.append(RawAttachment(_filename(part), ctype, _payload(part)))
            return ""
        text = _part_text(part)
        return html_to_text(text[:MAX_HTML_CHARS]) if ctype == "text/html" else tidy(text)

    def _alternative(self, kids: list[Message], depth: int) -> str:
        # Prefer text/plain; fall back to whatever alternative yields text.
        # Only the chosen alternative contributes attachments (others repeat them).
        order = sorted(kids, key=lambda k: 0 if k.get_content_type() == "text/plain" else 1)
        for kid in order:
            mark = len(self.attachments)
            text = self.text(kid, depth + 1)
            if text.strip():
                return text
            del self.attachments[mark:]
        return ""


def read_body(msg: Message) -> Body:
    walker = _Walker()
    text = walker.text(msg)
    return Body(full_text=text, attachments=walker.attachments)
