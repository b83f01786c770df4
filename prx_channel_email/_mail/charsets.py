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

CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# In a header value also: C1 controls (U+0085 breaks lines for str.splitlines), the
# Unicode line and paragraph separators, and the bidi embeddings, overrides and
# isolates that make a display name or filename read differently than it is.
HEADER_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BLANK_RUN_RE = re.compile(r"\n{3,}")
# Whitespace ending a line (what str.rstrip removes, newlines aside). Tried only
# where a run starts, and possessive, so a long run costs its length once, not
# its length squared.
_TRAILING_SPACE_RE = re.compile(r"(?<![^\S\n])[^\S\n]++$", re.MULTILINE)
_SPLIT_MAX = 1 << 20  # characters: above this, trailing blanks go by regex (less memory)

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
        except (UnicodeError, LookupError):
            continue
        if _SURROGATE_RE.search(text):  # some codecs yield lone surrogates
            continue
        return text.replace("\x00", "")
    return data.decode(tried[0], "replace").encode("utf-8", "replace").decode().replace("\x00", "")


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


def tidy(text: str) -> str:
    """Body text with unified line ends, no control or zero-width characters,
    no trailing blanks and at most one empty line in a row.

    Each step returns its input unchanged when there is nothing to change, so a
    clean big body is not copied once per step.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_RE.sub("", text).replace("\ufeff", "").replace("\u200b", "")
    if len(text) <= _SPLIT_MAX:
        text = "\n".join(line.rstrip() for line in text.split("\n"))  # fast, two copies
    else:
        text = _TRAILING_SPACE_RE.sub("", text)  # slower, copies only what changes
    if "\n\n\n" in text:
        text = _BLANK_RUN_RE.sub("\n\n", text)
    return text.strip()
