"""Bytes and header words -> text, whatever the charset label claims.

Mail mislabels its charsets routinely (latin-1 that is really windows-1252,
labels that name no codec, none at all). Everything that turns mail bytes into
text goes through here, so every field is decoded by the same rules, and control
characters never reach a header value.
"""

from __future__ import annotations

import codecs
import email.header
import re
from collections.abc import Iterator

CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# In a header value also: C1 controls (U+0085 breaks lines for str.splitlines), the
# Unicode line and paragraph separators, and the bidi embeddings, overrides and
# isolates that make a display name or filename read differently than it is.
HEADER_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BLANK_RUN_RE = re.compile(r"\n{3,}")

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
_NO_SURROGATES = frozenset({"utf-8", "cp1252", "ascii", "latin-1", "iso8859-1"})
_VAGUE_CHARSETS = frozenset({"", "unknown", "unknown-8bit", "x-unknown", "default", "charset"})


def _codec(label: str | None) -> str | None:
    name = (label or "").strip().strip("\"'").lower()
    if name in _VAGUE_CHARSETS:
        return None
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_bytes(data: bytes | memoryview, label: str | None) -> str:
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
            text = str(data, name)  # any buffer: a view of the message is not copied
        except (UnicodeError, LookupError):
            continue
        if name not in _NO_SURROGATES and _SURROGATE_RE.search(text):
            # some codecs yield lone surrogates (a 24 MB scan is not free: skipped
            # for the codecs that never do)
            continue
        return text.replace("\x00", "")
    text = str(data, tried[0], "replace")
    return text.encode("utf-8", "replace").decode().replace("\x00", "")


def unescape_header(value: str) -> str:
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
    text = unescape_header(value.replace("\r\n", "").replace("\n", ""))
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
    return HEADER_CONTROL_RE.sub("", text).replace("\r", " ").replace("\n", " ").strip()


#: Characters one C-level step of body text processing works on. A regex over a
#: whole 24 MB body held the GIL for seconds even on a worker thread (a body of
#: ``\x01`` took 2.1 s in one ``re.sub``); between pieces of this size other
#: threads, the event loop's included, get their turn.
CHUNK_CHARS = 64 * 1024


# What a long line's cut is moved back over: blanks and what _clean takes out.
_CUT_BACK = "".join(
    {chr(c) for c in range(0x3000 + 1) if chr(c).isspace()}
    | {chr(c) for c in (*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
    | {"\ufeff", "\u200b"}
)


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of at most about ``size`` characters, each cut
    just after a newline when there is one in reach; a line longer than that is
    cut before a run of blanks and removable characters where it can be, and
    never between CR and LF."""
    size = size or CHUNK_CHARS
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        piece = text[start:end]
        if end < n:
            newline = piece.rfind("\n")
            if newline >= 0:
                piece = piece[: newline + 1]
            else:
                kept = len(piece.rstrip(_CUT_BACK))
                if kept > 0:
                    piece = piece[:kept]
                elif piece[-1] == "\r" and text[end] == "\n":
                    piece += "\n"
        yield piece
        start += len(piece)


def _clean(text: str) -> str:
    """Line ends unified, control and zero-width characters gone."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return CONTROL_RE.sub("", text).replace("\ufeff", "").replace("\u200b", "")


def _unblank(text: str, whole_lines: bool) -> str:
    """Trailing blanks off every line (but a cut-off last one) and blank runs shortened."""
    lines = text.split("\n")
    last = None if whole_lines else lines.pop()
    text = "\n".join(line.rstrip() for line in lines)
    if last is not None:
        text = f"{text}\n{last}" if lines else last
    if "\n\n\n" in text:
        text = _BLANK_RUN_RE.sub("\n\n", text)
    return text


def tidy(text: str) -> str:
    """See :func:`tidy_owned`."""
    return tidy_owned([text])


def tidy_owned(box: list[str]) -> str:
    """:func:`tidy` of the one text in ``box``, taken out of it: a caller that keeps
    no other reference lets the text go before the result is joined (one copy of a
    big body less at the peak).

    Body text with unified line ends, no control or zero-width characters,
    no trailing blanks and at most one empty line in a row.

    Worked piece by piece (:func:`pieces`), so no single step holds the GIL for
    long, whatever the text's shape, and the result is built once (peak: the
    text, its pieces and the result). The blank-line rule holds across the
    seams; a line longer than CHUNK_CHARS may keep some trailing blanks.
    """
    text = box.pop()
    if len(text) <= CHUNK_CHARS:
        return _unblank(_clean(text), True).strip()
    out: list[str] = []
    tail = 0  # newlines ending what is in ``out`` so far
    for raw in pieces(text):
        piece = _clean(raw)
        piece = _unblank(piece, piece.endswith("\n"))
        lead = len(piece) - len(piece.lstrip("\n"))
        if lead == len(piece):  # newlines only
            piece = "\n" * max(0, min(lead, 2 - tail))
            tail += len(piece)
        else:
            if tail + lead > 2:
                piece = piece[min(lead, tail + lead - 2) :]
            tail = len(piece) - len(piece.rstrip("\n"))
        if piece:
            out.append(piece)
    del text, raw  # the pieces are all out: the text may go before the join
    while out and out[0].isspace():
        out.pop(0)
    while out and out[-1].isspace():
        out.pop()
    if out:
        out[0] = out[0].lstrip()
        out[-1] = out[-1].rstrip()
    return "".join(out)
