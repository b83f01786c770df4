"""Reply text: the sender's own words, without quoted history and signature.

A heuristic, so it never returns empty text for a message that had some.
"""

from __future__ import annotations

import re

from prx_channel_email._mail.charsets import tidy
from prx_channel_email._mail.reply_headers import Deadline, StripBudgetExceeded, find_reply_header

__all__ = ["STRIP_BUDGET_SECS", "StripBudgetExceeded", "new_text"]

STRIP_BUDGET_SECS = 0.25  # wall clock for one message's stripping; then content = full_text

MAX_STRIP_CHARS = 100_000  # quote stripping looks at this much text
_LINE_REACH = 16_384  # how far past MAX_STRIP_CHARS the head may reach to end its line
_QUOTE_LINE_RE = re.compile(r"^[ \t]*>")
_FORWARD_LINE = (
    r"[ \t]*(?:-{2,}[ \t]*(?:Forwarded message|Weitergeleitete Nachricht|Message transf[ée]r[ée]"
    r"|Mensaje reenviado|Messaggio inoltrato|Doorgestuurd bericht)[ \t]*-*"
    r"|Begin forwarded message:|Anfang der weitergeleiteten Nachricht:)[ \t]*$"
)


def _at_line_start(pattern: str, flags: int) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """``pattern`` (written for a line start) as two searches: at the text's start, and
    behind a newline. The second lets the regex engine skip ahead to each newline at C
    speed, where a MULTILINE ``^`` is tried at every position (six times slower)."""
    return re.compile(pattern, flags), re.compile("\n" + pattern, flags)


def _first_line(patterns: tuple[re.Pattern[str], re.Pattern[str]], text: str, end: int) -> int:
    """Where the first line of ``text[:end]`` matching starts, or -1."""
    first, rest = patterns
    if first.match(text, 0, end):
        return 0
    found = rest.search(text, 0, end)
    return found.start() + 1 if found else -1


_FORWARD_STARTS = _at_line_start(_FORWARD_LINE, re.IGNORECASE | re.MULTILINE)

# Where a signature starts. Deliberately narrow: cutting real text is worse than
# leaving a signature in (mail-parser-reply's own rule took any line starting
# with "-" for one, so a bulleted list lost everything below its first bullet).
_SIGNATURE_LINE = (
    r"(?:> ?)*(?:"
    r"-- ?$"  # the RFC 3676 delimiter (many clients drop the trailing space)
    r"|_{20,}$|-{20,}$"  # a long rule above a footer or disclaimer
    r"|(?:Sent from my|Sent from Mail for|Get Outlook for|Gesendet von|Von meinem)\b.*$"
    r")"
)
_SIGNATURE_START_RE = re.compile("^" + _SIGNATURE_LINE, re.MULTILINE)  # the rule, as one regex
_SIGNATURE_STARTS = _at_line_start(_SIGNATURE_LINE, re.MULTILINE)
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
    marker = _first_line(_SIGNATURE_STARTS, text, len(text))
    if marker >= 0 and text[:marker].strip():
        cut = marker
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


def _latest_reply(text: str, deadline: Deadline) -> str | None:
    """The newest reply in ``text``: cut at the first quoted-reply header and at the
    signature above it. None when there is nothing to cut.

    Lines are compared stripped (clients indent and pad them), and the newest
    part is returned that way.
    """
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    # Every reply header holds a colon (an attribution's or a field's) or a dashed
    # separator; text with neither has none (a C-speed test, skipping the scan).
    maybe = ":" in text or "\uff1a" in text or "---" in text
    header = find_reply_header(lines, deadline) if maybe else None
    newest = "\n".join(lines if header is None else lines[:header])
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


def _head_end(text: str) -> int:
    """Where the part of ``text`` that stripping looks at ends: the end of the line
    holding its MAX_STRIP_CHARS-th character, or, when that line goes on for more
    than _LINE_REACH (a one-line 24 MB body), MAX_STRIP_CHARS itself."""
    if len(text) <= MAX_STRIP_CHARS:
        return len(text)
    reach = text.find("\n", MAX_STRIP_CHARS, MAX_STRIP_CHARS + _LINE_REACH)
    if reach >= 0:
        return reach
    return len(text) if len(text) <= MAX_STRIP_CHARS + _LINE_REACH else MAX_STRIP_CHARS


def _strip(text: str, deadline: Deadline) -> str:
    cut = _head_end(text)
    head = text[:cut]
    latest = _latest_reply(head, deadline)
    # Lines are compared trimmed; when nothing was cut, the original layout
    # (list indentation, code) is kept.
    stripped = tidy(_strip_quote_lines(head if latest is None else latest))
    if cut < len(text) and len(stripped) >= len(head.strip()) - 1:
        if stripped == head or text[cut] != "\n":
            return text  # nothing changed (or the head ends inside a line): no copy
        stripped += text[cut:]  # nothing was cut: keep the rest too
    return stripped


def new_text(full_text: str, *, budget: float | None = STRIP_BUDGET_SECS) -> str:
    """The reply's own words: quoted history and signature removed.

    A heuristic (reply headers in twelve languages, ``>``-quote removal, a
    narrow signature rule), so it never returns empty text for a message that
    had some: then the whole text is kept. A forwarded message is what the
    sender wants read, so it is kept whole after the sender's own (stripped)
    words. Raises StripBudgetExceeded when stripping takes longer than
    ``budget`` seconds (the caller then keeps ``full_text``); every step is
    linear in the text's length, so only a starved machine gets there.
    """
    if not full_text or full_text.isspace():
        return ""
    deadline = Deadline(budget)
    marker = _first_line(_FORWARD_STARTS, full_text, _head_end(full_text))  # where stripping looks
    own, forwarded = (full_text[:marker], full_text[marker:]) if marker >= 0 else (full_text, "")
    stripped = _strip(own, deadline) if own.strip() else ""
    deadline.check()
    if not stripped and own.strip():
        # All of the head was quoted. Within the head's reach, drop the quotes of the
        # whole text; beyond it, keep the text (the budget covers this path too:
        # 15 MB of quotes took 3.6 s here).
        if _head_end(own) == len(own):
            stripped = tidy(_strip_quote_lines(own))
        stripped = stripped or own.strip()
    if forwarded:
        deadline.check()
        stripped = f"{stripped}\n\n{tidy(forwarded)}".strip()
    return stripped or full_text.strip()
