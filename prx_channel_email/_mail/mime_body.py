"""The MIME body walk: the text (plain preferred over HTML) and the attachments.

The MIME tree is bounded before any parser sees it: the standard library's MIME
parser recurses once per nesting level.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import email.utils
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from prx_channel_email._mail.charsets import (
    decode_bytes,
    decode_words,
    tidy_owned,
    unescape_header,
)
from prx_channel_email._mail.headers import Headers

MAX_MULTIPARTS = 100  # multipart containers in one message (nesting and fan-out)
MAX_BOUNDARY_LINES = 2000  # lines starting with "--": an upper bound on the part count
MAX_DEPTH = 40  # how deep the text walk follows nested parts
MAX_HTML_CHARS = 2_000_000  # HTML beyond this is cut before rendering


_MULTIPART_RE = re.compile(rb"multipart/", re.IGNORECASE)


class TooComplex(ValueError):
    """The MIME structure is beyond what the parser may safely be given."""


def check_structure(body: bytes, start: int = 0) -> None:
    """Refuse bodies whose MIME tree is too big to hand to a recursive parser.

    Counts are upper bounds found at C speed: lines starting with "--" (every
    part needs one), then, only when there are many of those, the "multipart/"
    declarations in any letter case (57 KB of "mUltipart" nesting slipped past a
    case-sensitive count into the recursive parser). Ordinary mail is far below both.
    """
    lines = body.count(b"\n--", start)
    if lines > MAX_BOUNDARY_LINES:
        raise TooComplex(f"more than {MAX_BOUNDARY_LINES} MIME boundary lines")
    # Other spellings ("mUltipart") slip past this count, but not past mail-parser's
    # own recursion guard, which the pipeline turns into a quarantine.
    if lines > MAX_MULTIPARTS:
        found = _MULTIPART_RE.finditer(body, start)
        if next(itertools.islice(found, MAX_MULTIPARTS, None), None) is not None:
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


# The top-level fields the MIME walk reads; everything else was read once already
# (headers.Headers) and is not handed to the MIME parser again.
_MIME_FIELDS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition", "mime-version"}
)
_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


class _SlicedPart(Message):
    """A part built by the fast split. A leaf's payload stays a view of the message
    bytes until something asks for it as text (the standard library keeps it as
    text, and decoding it again costs two more copies of its size); the MIME walk
    decodes straight from the view (see :func:`_payload`)."""

    view: memoryview | None = None

    @property
    def _payload(self) -> Any:
        if self.view is not None:
            self.__dict__["_text"] = self.view.tobytes().decode("ascii", "surrogateescape")
            self.view = None
        return self.__dict__.get("_text")

    @_payload.setter
    def _payload(self, value: Any) -> None:
        self.__dict__["_text"] = value
        self.view = None

    def is_multipart(self) -> bool:
        # A leaf still held as a view is not multipart: asking must not decode it
        # (that kept a second copy of a 24 MB body for the rest of the parse).
        return False if self.view is not None else super().is_multipart()


_SPLIT_PARSER = email.parser.BytesParser(_SlicedPart, policy=email.policy.compat32)


def mime_fields(headers: Headers) -> bytes:
    """The top-level MIME fields, as the lines the MIME parser is given."""
    return b"".join(
        name.encode("ascii", "surrogateescape")
        + b": "
        + value.encode("ascii", "surrogateescape")
        + b"\r\n"
        for name, value in headers.items()
        if name in _MIME_FIELDS
    )


def parse_message(headers: Headers, raw: bytes, body_at: int = 0) -> Message:
    """Parse the MIME tree of a message whose header block was already read.

    Only the top-level MIME fields are handed on with the body (the other fields
    were read once, by headers.Headers). Well-formed trees are split at their
    boundaries at C speed (:func:`_split_tree`); anything unusual goes to the
    standard library's compat32 parser, whose result the fast split reproduces
    exactly (tests/test_mime_body.py checks that). Raises TooComplex for a MIME
    tree that must not be parsed at all.
    """
    check_structure(raw, body_at)
    top = mime_fields(headers)
    try:
        return _split_tree(top, raw, body_at)
    except _Unusual:
        return _parse_unusual(top + b"\r\n" + raw[body_at:])


def _parse_unusual(data: bytes) -> Message:
    """The edge path: MIME the fast split steps aside for (broken boundaries, bare CR,
    message/* parts) goes through mail-parser, the parser this project names, which
    runs the standard compat32 parser under a recursion guard. Imported here, so a
    listening channel that never meets such mail never loads it."""
    import mailparser

    try:
        msg = mailparser.parse_from_bytes(data).message
    except (RecursionError, mailparser.exceptions.MailParserRecursionError) as exc:
        raise TooComplex("MIME nesting too deep") from exc  # a nesting the pre-count missed
    if not isinstance(msg, Message):
        raise TooComplex("mail-parser returned no message")
    return msg


class _Unusual(Exception):
    """The fast split cannot promise the standard parser's result: use that parser."""


_MAX_FAST_DEPTH = 20


def _split_tree(top: bytes, raw: bytes, body_at: int = 0) -> Message:
    """The compat32 parser's tree for well-formed MIME, built without reading it line by line.

    The standard parser feeds every line of the body through Python code (3 ms
    for a 200 KB attachment); here boundaries are found with ``bytes.find`` and
    leaf payloads are sliced, so the cost is a few passes over the bytes at C
    speed. Only the part headers go through the standard parser. Anything the
    slicing could read differently (bare CR line ends, a missing start or close
    boundary, doubled boundary lines, message/* parts, malformed part headers)
    raises _Unusual.
    """
    if raw.find(b"\r", body_at) >= 0 and raw.count(b"\r", body_at) != raw.count(b"\r\n", body_at):
        raise _Unusual("bare CR")  # the standard parser ends lines there too
    msg = _head(top + b"\r\n")
    _fill(msg, raw, body_at, len(raw), 0)
    return msg


def _head(block: bytes) -> _SlicedPart:
    msg = _SPLIT_PARSER.parsebytes(block, headersonly=True)
    assert isinstance(msg, _SlicedPart)
    if msg.get_payload() or msg.defects:
        raise _Unusual("not a clean header block")
    return msg


def _fill(msg: _SlicedPart, buf: bytes, lo: int, hi: int, depth: int) -> None:
    """Set ``msg``'s payload from ``buf[lo:hi]`` as the standard parser would."""
    maintype = msg.get_content_maintype()
    if maintype == "message" or depth > _MAX_FAST_DEPTH:
        raise _Unusual(maintype)
    if maintype != "multipart":
        msg.view = memoryview(buf)[lo:hi]
        return
    boundary = msg.get_boundary()
    if not boundary:
        raise _Unusual("multipart without a boundary")
    try:
        sep = b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        raise _Unusual("boundary not ASCII") from None
    lines: list[tuple[int, int]] = []  # (start, end) of each separator line
    closed = False
    for start, end, close in _separators(buf, sep, lo, hi):
        if lines and lines[-1][1] == start:
            raise _Unusual("adjacent boundary lines")
        lines.append((start, end))
        if close:
            closed = True
            break
    if not closed or len(lines) == 1:
        raise _Unusual("no start or no close boundary")
    parts: list[Message | str] = []
    for (_, begin), (end, _) in itertools.pairwise(lines):
        # The line end before a boundary belongs to the boundary (RFC 2046).
        if buf.startswith(b"\r\n", end - 2, end) and end - 2 >= begin:
            end -= 2
        elif buf.startswith(b"\n", end - 1, end) and end - 1 >= begin:
            end -= 1
        body_at = _body_start(buf, begin, end)
        part = _head(buf[begin:body_at])
        _fill(part, buf, body_at, end, depth + 1)
        parts.append(part)
    msg.set_payload(parts)


_SEPARATOR_TAIL = re.compile(rb"(--)?[ \t]*(?:\r?\n|\Z)")


def _separators(buf: bytes, sep: bytes, lo: int, hi: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is the close delimiter) of each boundary line in ``buf[lo:hi]``."""
    at = buf.find(sep, lo, hi)
    while at >= 0:
        if at == lo or buf[at - 1] == 0x0A:  # at a line start
            tail = _SEPARATOR_TAIL.match(buf, at + len(sep), hi)
            if tail is not None:
                yield at, tail.end(), tail.group(1) is not None
        at = buf.find(sep, at + len(sep), hi)


def _body_start(buf: bytes, lo: int, hi: int) -> int:
    """Where a part's payload starts: after its header block's first empty line."""
    if buf.startswith(b"\n", lo, hi):
        return lo + 1
    if buf.startswith(b"\r\n", lo, hi):
        return lo + 2
    crlf = buf.find(b"\n\r\n", lo, hi)
    lf = buf.find(b"\n\n", lo, crlf + 2 if crlf >= 0 else hi)
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else hi


def _fast_base64(part: Message) -> bytes | None:
    """A base64 payload decoded in one C call, or None when the standard decoder must
    judge it (bad padding or length): valid input decodes the same either way."""
    payload = part._payload  # type: ignore[attr-defined]  # read, like get_payload does
    if not isinstance(payload, str) or str(part.get("content-transfer-encoding", "")).lower() != (
        "base64"
    ):
        return None
    try:
        return binascii.a2b_base64(payload.encode("ascii", "surrogateescape"))
    except (binascii.Error, UnicodeEncodeError):
        return None


_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


def _from_view(part: _SlicedPart, view: memoryview) -> bytes | None:
    """A sliced leaf's payload decoded as ``get_payload(decode=True)`` would, from the
    bytes themselves; None when the standard decoder must judge it."""
    cte = str(part.get("content-transfer-encoding", "")).lower()
    if cte == "base64":
        try:
            return binascii.a2b_base64(view)
        except binascii.Error:
            return None
    if cte == "quoted-printable":
        return binascii.a2b_qp(view)  # what quopri.decodestring runs
    if cte in _UUENCODE:
        return None
    return view.tobytes()


def _unencoded_view(part: Message) -> memoryview | None:
    """A sliced leaf's bytes as they are, when no transfer encoding needs undoing:
    text is decoded straight from the message, with no copy of its bytes first."""
    if not isinstance(part, _SlicedPart) or part.view is None:
        return None
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    return part.view if cte in ("", "7bit", "8bit", "binary") else None


def _payload(part: Message) -> bytes:
    if isinstance(part, _SlicedPart) and part.view is not None:
        decoded = _from_view(part, part.view)
        if decoded is not None:
            return decoded
    fast = _fast_base64(part)
    if fast is not None:
        return fast
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
    data = _unencoded_view(part) or _payload(part)
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
    """The part's file name: RFC 2231 (``filename*=utf-8''...``), encoded words, or raw
    8-bit bytes (read as UTF-8, else windows-1252; the standard library would turn
    each such byte into U+FFFD)."""
    view = Message()
    for name, value in part.raw_items():
        if name.lower() in ("content-disposition", "content-type"):
            view[name] = unescape_header(str(value))
    try:
        found = view.get_filename()
    except Exception:
        found = None
    if found is None:
        try:
            param = view.get_param("name")
        except Exception:
            param = None
        if isinstance(param, tuple):  # an RFC 2231 value not collapsed by get_param
            param = email.utils.collapse_rfc2231_value(param)
        if not isinstance(param, str):
            return None
        found = param
    return decode_words(found) or None


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
        box = [_part_text(part)]  # tidy_owned takes it: no reference kept here
        if ctype == "text/html":
            # Imported on first HTML mail: lxml costs a listening channel ~5 MB at rest.
            from prx_channel_email._mail.html_text import html_to_text

            return html_to_text(box[0][:MAX_HTML_CHARS])
        return tidy_owned(box)

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
