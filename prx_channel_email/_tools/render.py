"""What a tool result looks like to a model: bounded text inside an unforgeable delimiter.

Every text taken from mail is untrusted: a mail may say "ignore your instructions".
A host keeps it apart from instructions by the delimiter around it::

    <<<untrusted-mail 3f9a0c1d2e4b5a6c>>>
    ...the mail's text...
    <<<end-untrusted-mail 3f9a0c1d2e4b5a6c>>>
    [cut: 1234 more characters not shown]

The token is random per :class:`Boundary` (one per MailboxTools, so per session) and
is never in the result's text otherwise: should the mail's text contain it (a model
that echoed it into a mail that came back), each occurrence is replaced first, so a
mail can never close the delimiter early. The cut marker is outside the delimiter:
it is ours, not the mail's.
"""

from __future__ import annotations

import secrets

ESCAPED = "[boundary removed]"


class Boundary:
    """The per-session delimiter; ``token`` is also in every result as ``boundary``."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_hex(8)
        self.opening = f"<<<untrusted-mail {self.token}>>>"
        self.closing = f"<<<end-untrusted-mail {self.token}>>>"

    def escape(self, text: str) -> str:
        """``text`` with every occurrence of the token replaced (case-insensitively)."""
        if self.token not in text.lower():
            return text
        out: list[str] = []
        lower, at = text.lower(), 0
        while True:
            found = lower.find(self.token, at)
            if found < 0:
                out.append(text[at:])
                return "".join(out)
            out.append(text[at:found])
            out.append(ESCAPED)
            at = found + len(self.token)

    def wrap(self, text: str, max_chars: int) -> tuple[str, int]:
        """(the delimited, bounded text, how many characters were cut)."""
        body, cut = bound(self.escape(text), max_chars)
        wrapped = f"{self.opening}\n{body}\n{self.closing}"
        if cut:
            wrapped += f"\n{cut_marker(cut)}"
        return wrapped, cut

    def line(self, text: str, max_chars: int) -> tuple[str, int]:
        """A short field (subject, display name): escaped and bounded, not delimited."""
        body, cut = bound(self.escape(text), max_chars)
        return (f"{body} {cut_marker(cut)}" if cut else body), cut


def bound(text: str, max_chars: int) -> tuple[str, int]:
    """The first ``max_chars`` characters of ``text`` and how many were cut."""
    if len(text) <= max_chars:
        return text, 0
    return text[:max_chars], len(text) - max_chars


def cut_marker(cut: int) -> str:
    return f"[cut: {cut} more characters not shown]"
