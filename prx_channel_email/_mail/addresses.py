"""RFC 5322 addresses, read strictly: who a mailbox-list field names.

Also the lexical pieces (quoted strings, nested comments) that the
Authentication-Results reader shares: both decide who sent a message, so both
must read these the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from prx_channel_email._mail.charsets import HEADER_CONTROL_RE, decode_words, unescape_header


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


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_address(address: str) -> str:
    """Case-fold an address (or an ``@domain`` entry) for comparison: ASCII letters
    only, and the domain in its A-label form (:func:`ascii_domain`).

    ``str.lower()`` maps look-alikes onto ASCII (the Kelvin sign U+212A becomes
    "k"), which would let ``\u212aate@example.test`` pass for ``kate@example.test``.
    Non-ASCII characters are therefore compared exactly as written.
    """
    folded = address.strip().translate(_ASCII_LOWER)
    if folded.isascii() or "@" not in folded:
        return folded
    local, _, domain = folded.rpartition("@")
    return f"{local}@{ascii_domain(domain)}"


def ascii_domain(domain: str) -> str:
    """A domain in its A-label (``xn--``) form, ASCII lower-cased, so that an entry, a
    From and a provider's verdict agree whichever form each was written in.

    IDNA 2008 without UTS 46 mapping: nothing is mapped onto ASCII (no look-alike
    becomes a real name), and a name that is not a valid IDN stays as written,
    so it can only ever equal itself.
    """
    folded = domain.strip().translate(_ASCII_LOWER)
    if folded.isascii():
        return folded
    import idna  # non-ASCII domains only

    try:
        return idna.encode(folded.rstrip(".")).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return folded


def _addr_spec(tok: _Tok) -> str:
    """``local@domain`` from one word, ASCII lower-cased; a quoted local part is accepted
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
    return fold_address(f"{local}@{domain}")


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
    text = HEADER_CONTROL_RE.sub("", unescape_header(value.replace("\r\n", " ").replace("\n", " ")))
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


def readable_mailboxes(value: str | None) -> list[tuple[str | None, str]]:
    """The readable mailboxes of a field (Reply-To), unreadable elements left out."""
    return [m for m in parse_mailboxes(value) if isinstance(m, tuple)]
