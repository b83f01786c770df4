"""The header block: split off, capped, and read into fields.

Sizes are capped *before* any decoder sees the bytes, because header decoding in
both mail-parser and the standard library is quadratic in the number of encoded
words. The capping never changes whose mail it is (see cap_header_block).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.message import Message

from prx_channel_email._mail.charsets import decode_words

MAX_HEADER_BYTES = 64 * 1024  # the whole header block handed to any decoder
MAX_FIELD_BYTES = 8 * 1024  # one header field (a 560 KB Subject took 33 s to decode)
MAX_HEADER_SCAN = 1024 * 1024  # header bytes even split into fields; the rest is ignored

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
        "x-precedence",
        "list-id",
        "list-unsubscribe",
        "authentication-results",
    }
)
# Fields whose truncation could change whose mail it is or who vouched for it.
_IDENTITY = frozenset({"from", "sender", "reply-to", "authentication-results"})
_FROM_FIELD_RE = re.compile(rb"^from[ \t]*:", re.IGNORECASE | re.MULTILINE)


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line; a message without one is all header."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    at = body_start(raw)
    return raw[:at], raw[at:]


def body_start(raw: bytes) -> int:
    """Where the body starts: after the first empty line (the end when there is none).

    A message that starts with an empty line has no header block; its body is all
    of it (the empty line included, as split_header_block has always read it).
    """
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    crlf = raw.find(b"\r\n\r\n")
    # Only look for a bare-LF blank line before the CRLF one (never scan the whole body).
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    if crlf >= 0:
        return crlf + 4
    return len(raw)


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
