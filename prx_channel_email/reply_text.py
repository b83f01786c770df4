"""Reply text: the sender's own words, without quoted history and signature.

A heuristic, so it never returns empty text for a message that had some.
"""

from __future__ import annotations

import re

from mailparser_reply.parser import EmailMessage

from .charsets import tidy

MAX_STRIP_CHARS = 100_000  # quote stripping (regex heavy) looks at this much text
_QUOTE_LINE_RE = re.compile(r"^[ \t]*>")
_FORWARD_RE = re.compile(
    r"^[ \t]*(?:-{2,}[ \t]*(?:Forwarded message|Weitergeleitete Nachricht|Message transf[ée]r[ée]"
    r"|Mensaje reenviado|Messaggio inoltrato|Doorgestuurd bericht)[ \t]*-*"
    r"|Begin forwarded message:|Anfang der weitergeleiteten Nachricht:)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)

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
    stripped = tidy(_strip_quote_lines(head if latest is None else latest))
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
        stripped = tidy(_strip_quote_lines(own)) or tidy(own)
    if forwarded:
        stripped = f"{stripped}\n\n{tidy(forwarded)}".strip()
    return stripped or full_text.strip()
