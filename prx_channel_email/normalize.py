"""Raw RFC 5322 bytes -> the fields of a ChannelMessage.

Everything here is pure CPU work on one message (no I/O, no state), so the
pipeline can run it on a worker thread for big mail. Hostile input is expected:
sizes are capped *before* any decoder sees the bytes, because header decoding in
both mail-parser and the standard library is quadratic in the number of encoded
words, and the standard library's MIME parser recurses once per nesting level.
"""

from __future__ import annotations

import codecs
import email.header
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from email.message import Message

import mailparser
from mailparser_reply.parser import EmailMessage

from .html_text import html_to_text
from .message_ids import normalize_id, parse_id_list, synthetic_message_id
from .rfc5322 import Unterminated, read_comment, read_quoted

MAX_HEADER_BYTES = 64 * 1024  # the whole header block handed to any decoder
MAX_FIELD_BYTES = 8 * 1024  # one header field (a 560 KB Subject took 33 s to decode)
MAX_HEADER_SCAN = 1024 * 1024  # header bytes even split into fields; the rest is ignored
MAX_MULTIPARTS = 100  # multipart containers in one message (nesting and fan-out)
MAX_BOUNDARY_LINES = 2000  # lines starting with "--": an upper bound on the part count
MAX_DEPTH = 40  # how deep the text walk follows nested parts
MAX_STRIP_CHARS = 100_000  # quote stripping (regex heavy) looks at this much text
MAX_HTML_CHARS = 2_000_000  # HTML beyond this is cut before rendering

# Fields that decide how the body is read, or who sent it: kept even when the
# header block is over its budget (oversized fields are still truncated).
_ESSENTIAL = frozenset(
    {
        "from",
        "reply-to",
        "sender",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "return-path",
        "auto-submitted",
        "precedence",
        "list-id",
        "list-unsubscribe",
        "authentication-results",
    }
)
# Fields whose truncation could change whose mail it is or who vouched for it.
_IDENTITY = frozenset({"from", "sender", "reply-to", "authentication-results"})
_FROM_FIELD_RE = re.compile(rb"^from[ \t]*:", re.IGNORECASE | re.MULTILINE)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUN_RE = re.compile(r"\n{3,}")
_QUOTE_LINE_RE = re.compile(r"^[ \t]*>")
_FORWARD_RE = re.compile(
    r"^[ \t]*(?:-{2,}[ \t]*(?:Forwarded message|Weitergeleitete Nachricht|Message transf[ée]r[ée]"
    r"|Mensaje reenviado|Messaggio inoltrato|Doorgestuurd bericht)[ \t]*-*"
    r"|Begin forwarded message:|Anfang der weitergeleiteten Nachricht:)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)

# Labels that are routinely wrong or vague, mapped to the codec that real mail
# labelled so actually uses (the same choices browsers make, per WHATWG Encoding).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso_8859-1": "cp1252",
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "ansi_x3.4-1968": "utf-8",
    "utf8": "utf-8",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "x-sjis": "cp932",
    "sjis": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "unicode-1-1-utf-7": "utf-7",
}
_VAGUE_CHARSETS = frozenset({"", "unknown", "unknown-8bit", "x-unknown", "default", "charset"})

# English and German client styles (each language adds to every message's cost).
_REPLY_LANGUAGES = ["en", "de"]


_PROTOTYPE = EmailMessage(text="", languages=list(_REPLY_LANGUAGES))
_REPLY_PATTERNS = {
    "_header_regex": _PROTOTYPE.HEADER_REGEX,
    "_signature_regex": _PROTOTYPE.SIGNATURE_REGEX,  # compiled once; unused (see _cut_signature)
}


# Every English or German reply header the patterns above can match contains one
# of these (lower-cased); text with none of them skips the costly regex scan.
# tests/test_normalize.py checks this against the patterns themselves.
_HEADER_HINTS = (
    "wrote", "schrieb", "original message",
    "from:", "sent:", "to:", "subject:", "date:", "cc:", "organization:",
    "von:", "gesendet:", "an:", "betreff:", "datum:", "organisation:",
)  # fmt: skip


def may_have_reply_header(text: str) -> bool:
    low = text.lower()
    return any(hint in low for hint in _HEADER_HINTS)


# Where a signature starts. Deliberately narrow: cutting real text is worse than
# leaving a signature in (mail-parser-reply's own rule took any line starting
# with "-" for one, so a bulleted list lost everything below its first bullet).
_SIGNATURE_START_RE = re.compile(
    r"^(?:> ?)*(?:"
    r"-- ?$"  # the RFC 3676 delimiter (many clients drop the trailing space)
    r"|_{20,}$|-{20,}$"  # a long rule above a footer or disclaimer
    r"|(?:Sent from my|Sent from Mail for|Get Outlook for|Gesendet von|Von meinem)\b.*$"
    r")",
    re.MULTILINE,
)
# A closing salutation on a line of its own, e.g. "Best regards," or "Viele Grüße".
_CLOSING_RE = re.compile(
    r"^(?:> ?)*(?:Best regards|Kind regards|Warm regards|Regards|Best wishes|Best|All the best"
    r"|Cheers|Thanks|Thank you|Many thanks|Thanks again"
    r"|Mit freundlichen Gr(?:ü|ue)(?:ß|ss)en|(?:Beste|Viele|Liebe|Herzliche) Gr(?:ü|ue)(?:ß|ss)e"
    r"|Gr(?:ü|ue)(?:ß|ss)e|Gru(?:ß|ss)|LG|VG)[ \t]*[,.!]?[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
# What may follow a closing salutation for it to count as a signature: a name,
# a title, a phone number; a few short lines, not another paragraph of text.
_MAX_SIGNATURE_LINES = 6
_MAX_SIGNATURE_LINE = 72


def _closing_window(text: str, end: int) -> int:
    """Where a closing salutation that may count can start, in ``text[:end]``.

    What follows the salutation (leading and trailing whitespace stripped) must
    be 1-6 lines, so it starts within the last 6 lines; the salutation is the
    last non-blank line above that, or one of those lines. Only this window is
    scanned, which keeps the cut linear in the text's length.
    """
    stop = len(text[:end].rstrip())
    start = stop
    for _ in range(_MAX_SIGNATURE_LINES):  # back to the start of the 6th-last line
        start = text.rfind("\n", 0, max(start - 1, 0)) + 1 if start > 0 else 0
    above = len(text[:start].rstrip())  # the last non-blank line above the window
    return text.rfind("\n", 0, above) + 1 if above > 0 else 0


def _cut_signature(text: str) -> str | None:
    """``text`` without its trailing signature, or None when none was found."""
    cut: int | None = None
    marker = _SIGNATURE_START_RE.search(text)
    if marker is not None and text[: marker.start()].strip():
        cut = marker.start()
    end = cut if cut is not None else len(text)
    first = len(text) - len(text.lstrip())  # the first non-blank character
    for closing in _CLOSING_RE.finditer(text, _closing_window(text, end), end):
        tail = text[closing.end() : cut].strip().splitlines()
        if (
            first < closing.start()  # some text above it
            and 1 <= len(tail) <= _MAX_SIGNATURE_LINES  # a name below it, nothing long
            and all(len(line) <= _MAX_SIGNATURE_LINE for line in tail)
        ):
            cut = closing.start()
            break
    return text[:cut].rstrip() if cut is not None else None


def _latest_reply(text: str) -> str | None:
    """The newest reply in ``text``: cut at the first quoted-reply header (per
    mail-parser-reply's client patterns) and at the signature above it.

    The library's own ``read()`` splits the whole thread and scans every part;
    only the newest part is wanted here. None when there is nothing to cut.
    """
    message = EmailMessage(text=text, languages=list(_REPLY_LANGUAGES), **_REPLY_PATTERNS)
    normalized: str = message.text
    header = message.HEADER_REGEX.search(normalized) if may_have_reply_header(normalized) else None
    newest = normalized[: header.start()] if header else normalized
    unsigned = _cut_signature(newest)
    if header is None and unsigned is None:
        return None  # nothing to cut
    return (newest if unsigned is None else unsigned).strip()


class TooComplex(ValueError):
    """The MIME structure is beyond what the parser may safely be given."""


# --- bytes and charsets ----------------------------------------------------


def _codec(label: str | None) -> str | None:
    name = (label or "").strip().strip("\"'").lower()
    if name in _VAGUE_CHARSETS:
        return None
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes, label: str | None) -> str:
    """Decode text whose charset label may be wrong, vague or unknown.

    Order: the label (when it names a real codec), then UTF-8, then windows-1252
    (the usual truth behind a wrong label), then the label or UTF-8 with
    replacement characters. The result never carries NUL or lone surrogates.
    """
    tried: list[str] = []
    for name in (_codec(label), "utf-8", "cp1252"):
        if name is None or name in tried:
            continue
        tried.append(name)
        try:
            text = data.decode(name)
            text.encode("utf-8")  # some codecs yield lone surrogates
        except (UnicodeError, LookupError):
            continue
        return text.replace("\x00", "")
    return data.decode(tried[0], "replace").encode("utf-8", "replace").decode().replace("\x00", "")


def _unescape(value: str) -> str:
    """Undo the surrogate escapes compat32 uses for raw 8-bit header bytes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return decode_bytes(value.encode("ascii", "surrogateescape"), "utf-8")
    return value


def decode_words(value: str | None) -> str:
    """A header value as text: unfolded, encoded words decoded, control chars removed."""
    if not value:
        return ""
    text = _unescape(value.replace("\r\n", "").replace("\n", ""))
    if "=?" in text:
        try:
            chunks = email.header.decode_header(text)
        except Exception:
            chunks = [(text, None)]
        out: list[str] = []
        for chunk, charset in chunks:
            if isinstance(chunk, bytes):
                out.append(decode_bytes(chunk, charset))
            else:
                out.append(chunk)
        text = "".join(out)
    return _CONTROL_RE.sub("", text).replace("\r", " ").replace("\n", " ").strip()


# --- header capping and reading --------------------------------------------


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line; a message without one is all header."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    crlf = raw.find(b"\r\n\r\n")
    # Only look for a bare-LF blank line before the CRLF one (never scan the whole body).
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return raw[: lf + 2], raw[lf + 2 :]
    if crlf >= 0:
        return raw[: crlf + 4], raw[crlf + 4 :]
    return raw, b""


def _fields(block: bytes) -> Iterator[bytes]:
    current: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            yield b"".join(current)
        current = [line]
    if current:
        yield b"".join(current)


def cap_header_block(block: bytes) -> bytes:
    """Bound the header block: each field to MAX_FIELD_BYTES, the whole to MAX_HEADER_BYTES.

    Over budget, non-essential fields are dropped; essential ones (who sent it,
    how the body is encoded, the loop-guard and authenticity headers) are kept
    truncated, so policy still sees them. Only the first MAX_HEADER_SCAN bytes
    are split into fields at all (cut at a line end): no real header block comes
    near that, and splitting megabytes of one-byte lines would cost seconds.

    The fields that say who sent the mail and who vouched for it are never
    truncated into a different meaning (``alice@victim.example <padding>
    <eve@evil.example>`` cut short would read as alice): an oversized one is kept
    with an empty value, and one dropped for budget, or found only beyond the
    scan limit (From), leaves an empty field in its place, so a second From is
    still seen as a second From.
    """
    late_from = False
    if len(block) > MAX_HEADER_SCAN:
        end = block.rfind(b"\n", 0, MAX_HEADER_SCAN)
        cut_at = end + 1 if end >= 0 else MAX_HEADER_SCAN
        late_from = _FROM_FIELD_RE.search(block, cut_at) is not None  # C speed
        block = block[:cut_at]
    if b"\x00" in block:
        block = block.replace(b"\x00", b"")
    if not late_from and (
        len(block) <= MAX_FIELD_BYTES
        or (
            len(block) <= MAX_HEADER_BYTES
            and all(len(f) <= MAX_FIELD_BYTES for f in _fields(block))
        )
    ):
        return block
    kept: list[bytes] = []
    total = 0
    placeholders: dict[str, int] = {}
    for fld in _fields(block):
        if not fld.strip():
            continue
        raw_name = fld.split(b":", 1)[0]
        name = raw_name.strip().lower().decode("ascii", "replace")
        if len(fld) > MAX_FIELD_BYTES:
            if name in _IDENTITY:
                fld = raw_name + b":\r\n"  # unreadable, never misread
            else:
                cut = fld[:MAX_FIELD_BYTES]
                # Never leave half an encoded word behind: cut at the last whitespace.
                space = max(cut.rfind(b" "), cut.rfind(b"\t"))
                fld = (cut[:space] if space > len(name) + 1 else cut).rstrip() + b"\r\n"
        if (total + len(fld) > MAX_HEADER_BYTES and name not in _ESSENTIAL) or (
            total + len(fld) > 2 * MAX_HEADER_BYTES
        ):
            if name not in _IDENTITY or placeholders.get(name, 0) >= 2:
                continue
            placeholders[name] = placeholders.get(name, 0) + 1
            fld = raw_name + b":\r\n"
        kept.append(fld if fld.endswith(b"\n") else fld + b"\r\n")
        total += len(fld)
    if late_from:
        kept.append(b"From:\r\n")
    return b"".join(kept) + b"\r\n"


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


class Headers:
    """The raw header fields of one message, in order (top first), by lower-case name."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for name, value in items:
            self._first.setdefault(name, value)

    @classmethod
    def of_message(cls, msg: Message) -> Headers:
        return cls(
            [
                (str(k).strip().lower(), v if isinstance(v, str) else str(v))
                for k, v in msg.raw_items()
            ]
        )

    @classmethod
    def from_block(cls, block: bytes) -> Headers:
        """Read a header block (capped here first); lines that are not fields are skipped."""
        items: list[tuple[str, str]] = []
        for fld in _fields(cap_header_block(block)):
            name, colon, value = fld.partition(b":")
            name = name.strip()
            if not colon or not name or b" " in name or b"\t" in name:
                continue  # an mbox "From " line, or garbage
            text = value.lstrip(b" \t").rstrip(b"\r\n").decode("ascii", "surrogateescape")
            items.append((name.decode("ascii", "surrogateescape").lower(), text))
        return cls(items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self._items if k == key]

    def get(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def text(self, name: str) -> str:
        return decode_words(self.get(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


# --- the header-derived fields ----------------------------------------------


# --- addresses (RFC 5322 mailbox lists, read strictly) --------------------------

# Why a From field yields no sender (also policy reason codes).
NO_SENDER = "no_sender"  # missing, empty, or not a readable mailbox
AMBIGUOUS_SENDER = "ambiguous_sender"  # more than one mailbox, or text beside the address

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+"
_DOT_ATOM_RE = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*$")
_ATOM_STOP = frozenset('"()<>,:;\\')

# One word of an address: its segments, each (text, was quoted).
_Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class _Tok:
    kind: str  # "word", "comment", "ws", or one of the specials "<", ">", ",", ":", ";"
    text: str = ""  # a word's text (quotes removed), a comment's content
    segments: tuple[tuple[str, bool], ...] = ()  # a word's pieces: (text, was quoted)


class _BadAddress(ValueError):
    pass


def _word(segments: _Segments) -> _Tok:
    return _Tok("word", "".join(t for t, _ in segments), tuple(segments))


def _address_tokens(text: str) -> Iterator[_Tok]:
    """Tokens of an address header: words, comments, whitespace and the specials
    "<", ">", ",", ":", ";". Quoted strings and comments (nested, with escapes)
    are read whole; an unterminated one raises rfc5322.Unterminated."""
    i, n = 0, len(text)
    word: _Segments = []
    while i < n:
        ch = text[i]
        if ch == '"':
            i, content = read_quoted(text, i)
            word.append((content, True))
            continue
        if ch not in _ATOM_STOP and not ch.isspace():
            j = i
            while j < n and text[j] not in _ATOM_STOP and not text[j].isspace():
                j += 1
            word.append((text[i:j], False))
            i = j
            continue
        if word:
            yield _word(word)
            word = []
        if ch == "(":
            i, content = read_comment(text, i)
            yield _Tok("comment", content)
        elif ch.isspace():
            yield _Tok("ws")
            i += 1
        elif ch == "\\":
            raise _BadAddress("stray backslash")
        else:
            yield _Tok(ch)
            i += 1
    if word:
        yield _word(word)


def _addr_spec(tok: _Tok) -> str:
    """``local@domain`` from one word, lower-cased; a quoted local part is accepted
    only when it is plain dot-atom text, so the result is always a simple address."""
    word = list(tok.segments)
    at = max((k for k, (text, quoted) in enumerate(word) if not quoted and "@" in text), default=-1)
    if at < 0:
        raise _BadAddress("no @")
    text, _ = word[at]
    head, _, domain = text.rpartition("@")
    local_parts = [*word[:at], (head, False)] if head else word[:at]
    domain_parts = [(domain, False), *word[at + 1 :]]
    if any(quoted for _, quoted in domain_parts):
        raise _BadAddress("quoted domain")
    domain = "".join(t for t, _ in domain_parts)
    if len(local_parts) == 1 and local_parts[0][1]:
        local = local_parts[0][0]  # "john.doe"@example.com is john.doe@example.com
    elif any(quoted for _, quoted in local_parts):
        raise _BadAddress("partly quoted local part")
    else:
        local = "".join(t for t, _ in local_parts)
    if not _DOT_ATOM_RE.match(local) or not _DOT_ATOM_RE.match(domain):
        raise _BadAddress("not a simple address")
    return f"{local}@{domain}".lower()


def _phrase(tokens: list[_Tok]) -> str | None:
    words = [t.text for t in tokens if t.kind == "word"]
    text = decode_words(" ".join(words)).strip().strip('"').strip()
    return text or None


def _mailbox(tokens: list[_Tok]) -> tuple[str | None, str]:
    """One element of a mailbox list: ``[display-name] <addr-spec>`` or ``addr-spec``.

    Raises ValueError(AMBIGUOUS_SENDER) when the element holds more than one
    address-like part, _BadAddress when it holds no readable address.
    """
    kinds = [t.kind for t in tokens]
    if ":" in kinds or ";" in kinds:
        raise _BadAddress("group syntax")
    if "<" in kinds or ">" in kinds:
        if kinds.count("<") != 1 or kinds.count(">") != 1:
            raise ValueError(AMBIGUOUS_SENDER)
        lt, gt = kinds.index("<"), kinds.index(">")
        if gt < lt:
            raise _BadAddress("'>' before '<'")
        if any(k not in ("ws", "comment") for k in kinds[gt + 1 :]):
            raise ValueError(AMBIGUOUS_SENDER)  # <alice@victim.example>eve@evil.example
        inner = [t for t in tokens[lt + 1 : gt] if t.kind not in ("comment", "ws")]
        if len(inner) != 1 or inner[0].kind != "word":
            raise _BadAddress("not one address inside <>")
        # The display name is only a name, whatever it looks like: in
        # 'alice@victim.example <eve@evil.example>' the mailbox is eve's.
        return _phrase(tokens[:lt]), _addr_spec(inner[0])
    words = [t for t in tokens if t.kind == "word"]
    if len(words) != 1:
        if sum("@" in w.text for w in words) > 1:
            raise ValueError(AMBIGUOUS_SENDER)
        raise _BadAddress("not one address")
    comments = [t.text for t in tokens if t.kind == "comment" and t.text.strip()]
    display = decode_words(comments[-1]).strip().strip('"').strip() if comments else ""
    return display or None, _addr_spec(words[0])


def parse_mailboxes(value: str | None) -> list[tuple[str | None, str] | str]:
    """The elements of a mailbox-list field: (display name, address) for each
    readable mailbox, or a reason code (NO_SENDER / AMBIGUOUS_SENDER) for each
    element that is not one. Empty elements are skipped. Encoded words are
    decoded only inside display names, never before the structure is read."""
    if not value:
        return []
    text = _CONTROL_RE.sub("", _unescape(value.replace("\r\n", " ").replace("\n", " ")))
    try:
        tokens = list(_address_tokens(text.replace("\r", " ")))
    except (_BadAddress, Unterminated):
        return [NO_SENDER]
    elements: list[list[_Tok]] = [[]]
    depth = 0  # a "," inside <...> does not separate
    for tok in tokens:
        if tok.kind == "<":
            depth += 1
        elif tok.kind == ">":
            depth -= 1
        if tok.kind == "," and depth <= 0:
            elements.append([])
        else:
            elements[-1].append(tok)
    out: list[tuple[str | None, str] | str] = []
    for element in elements:
        if all(t.kind in ("ws", "comment") for t in element):
            continue
        try:
            out.append(_mailbox(element))
        except (_BadAddress, Unterminated):
            out.append(NO_SENDER)
        except ValueError as exc:
            out.append(str(exc))
    return out


def _addresses(value: str | None) -> list[tuple[str | None, str]]:
    """The readable mailboxes of a field (Reply-To), unreadable elements left out."""
    return [m for m in parse_mailboxes(value) if isinstance(m, tuple)]


def sender_of(headers: Headers) -> tuple[str | None, str, str | None]:
    """(display name, address, problem) of the one From mailbox.

    Exactly one From field holding exactly one well-formed mailbox, or the
    problem (NO_SENDER, AMBIGUOUS_SENDER) and an empty address. Sender is never
    used instead: it names whoever submitted the mail, not its author, and mail
    whose From cannot be read is not trusted to anyone's name.
    """
    fields = headers.get_all("from")
    if len(fields) > 1:
        return None, "", AMBIGUOUS_SENDER
    found = parse_mailboxes(fields[0]) if fields else []
    if not found:
        return None, "", NO_SENDER
    if len(found) > 1:
        return None, "", AMBIGUOUS_SENDER
    only = found[0]
    if isinstance(only, str):
        return None, "", only
    return only[0], only[1], None


def parse_timestamp(value: str | None, arrival: float) -> int:
    """Unix seconds of a Date header (its zone honoured; -0000 read as UTC), else arrival."""
    if value:
        try:
            when = email.utils.parsedate_to_datetime(decode_words(value))
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return int(when.timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return int(arrival)


@dataclass(frozen=True)
class Envelope:
    """What the headers alone say: enough for policy and for threading."""

    message_id: str
    sender: str
    sender_display: str | None
    reply_target: str
    subject: str
    timestamp: int
    thread_ts: str
    in_reply_to: str | None
    references: list[str]
    headers: Headers = field(repr=False, compare=False)
    # Why ``sender`` is empty: NO_SENDER or AMBIGUOUS_SENDER (None when it is set).
    sender_problem: str | None = None


def header_message_id(value: str | None) -> str | None:
    """The Message-ID a Message-ID header value names (encoded words decoded), or None.

    The transport's early duplicate check uses it too: both must read the same id.
    """
    return normalize_id(decode_words(value))


def envelope(
    headers: Headers, id_source: bytes, arrival: float, *, message_id: str | None = None
) -> Envelope:
    """The header-derived ChannelMessage fields; ``id_source`` seeds a missing Message-ID.

    ``message_id``: the identity the transport already decided on; used as is.
    """
    message_id = (
        message_id
        or header_message_id(headers.get("message-id"))
        or synthetic_message_id(id_source)
    )
    display, sender, problem = sender_of(headers)
    reply_to = _addresses(headers.get("reply-to"))
    references = parse_id_list(decode_words(headers.get("references")))
    in_reply_to = next(iter(parse_id_list(decode_words(headers.get("in-reply-to")))), None)
    thread_ts = references[0] if references else (in_reply_to or message_id)
    return Envelope(
        message_id=message_id,
        sender=sender,
        sender_display=display,
        reply_target=reply_to[0][1] if reply_to else sender,
        subject=headers.text("subject"),
        timestamp=parse_timestamp(headers.get("date"), arrival),
        thread_ts=thread_ts,
        in_reply_to=in_reply_to,
        references=references,
        headers=headers,
        sender_problem=problem,
    )


# --- the body ----------------------------------------------------------------


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


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text).replace("\ufeff", "").replace("\u200b", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUN_RE.sub("\n\n", text).strip()


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
        return html_to_text(text[:MAX_HTML_CHARS]) if ctype == "text/html" else _tidy(text)

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


# --- new text only --------------------------------------------------------------


def _strip_quote_lines(text: str) -> str:
    """Drop ``>``-quoted lines and the attribution line just above the first block."""
    lines = text.split("\n")
    kept = [ln for ln in lines if not _QUOTE_LINE_RE.match(ln)]
    if len(kept) == len(lines):
        return text
    first = next(i for i, ln in enumerate(lines) if _QUOTE_LINE_RE.match(ln))
    above = [ln for ln in lines[:first] if ln.strip()]
    if above and above[-1].rstrip().endswith(":"):
        attribution = above[-1]
        kept.remove(attribution)
    return "\n".join(kept)


def _strip(text: str) -> str:
    head, tail = text[:MAX_STRIP_CHARS], text[MAX_STRIP_CHARS:]
    try:
        latest = _latest_reply(head)
    except Exception:
        latest = None
    # The reply parser also trims every line; when it cut nothing, the original
    # layout (list indentation, code) is kept.
    stripped = _tidy(_strip_quote_lines(head if latest is None else latest))
    if tail and len(stripped) >= len(head.strip()) - 1:
        stripped += tail  # nothing was cut: keep the rest too
    return stripped


def new_text(full_text: str) -> str:
    """The reply's own words: quoted history and signature removed.

    A heuristic (mail-parser-reply plus ``>``-quote removal), so it never returns
    empty text for a message that had some: then the whole text is kept. A
    forwarded message is what the sender wants read, so it is kept whole after
    the sender's own (stripped) words.
    """
    if not full_text.strip():
        return ""
    marker = _FORWARD_RE.search(full_text)
    own, forwarded = (
        (full_text[: marker.start()], full_text[marker.start() :]) if marker else (full_text, "")
    )
    stripped = _strip(own) if own.strip() else ""
    if not stripped and own.strip():
        stripped = _tidy(_strip_quote_lines(own)) or _tidy(own)
    if forwarded:
        stripped = f"{stripped}\n\n{_tidy(forwarded)}".strip()
    return stripped or full_text.strip()
