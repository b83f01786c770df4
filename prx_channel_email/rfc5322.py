"""RFC 5322 lexical pieces shared by the address parser (normalize.py) and the
Authentication-Results parser (policy.py): quoted strings and nested comments.

Both parsers decide who sent a message, so both must read these the same way.
"""

from __future__ import annotations


class Unterminated(ValueError):
    """A quoted string or a comment that never ends."""


def read_quoted(text: str, i: int) -> tuple[int, str]:
    """(index past the quoted string opening at ``text[i]``, its content, escapes resolved)."""
    out: list[str] = []
    i, n = i + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return i + 1, "".join(out)
        out.append(ch)
        i += 1
    raise Unterminated("unterminated quoted string")


def read_comment(text: str, i: int, *, quotes: bool = False) -> tuple[int, str]:
    """(index past the comment opening at ``text[i]``, its content without the outer
    parentheses). Comments nest and honour backslash escapes.

    With ``quotes`` a double quote inside the comment opens a quoted run in which
    parentheses do not count (not RFC 5322, but what a server that echoes a quoted
    address into a comment means).
    """
    out: list[str] = []
    depth, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"' and quotes:
            i, content = read_quoted(text, i)
            out.append(content)
            continue
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i + 1, "".join(out)[1:]
        out.append(ch)
        i += 1
    raise Unterminated("unterminated comment")
