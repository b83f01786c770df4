"""Reading Authentication-Results (RFC 8601): one reader for the policy and the doctor.

Which field is believed, how it is tokenized, and what it says about the From
domain are decided here only, so the doctor's advice ("paste this line") is
judged by exactly the code that later accepts or refuses the mail.

DMARC relaxed alignment uses the Public Suffix List bundled with the
``publicsuffixlist`` package (read from disk once, on first use; never fetched).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prx_channel_email._mail.addresses import (
    Unterminated,
    ascii_domain,
    read_comment,
    read_quoted,
)
from prx_channel_email._mail.headers import Headers

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

# The trusted_authserv_ids entry that stands for a field without an authserv-id
# (Microsoft's style: "Authentication-Results: spf=pass ...; dmarc=pass ...").
NO_ID = "@none"
# AuthVerdict.detail prefix: the trusted server could not complete a check.
TEMPERROR = "temperror"

# A trusted server's field echoes sender-chosen text (envelope sender, HELO name,
# header.from) inside quoted strings and comments. It is therefore tokenized, not
# searched: comments are skipped (nesting, backslash escapes), quoted strings stay
# one opaque piece (escapes resolved), and only a top-level ";" ends a clause.
_METHOD_RE = re.compile(r"^([a-z0-9_-]+)(?:/[0-9]+)?$", re.I)
_KEYWORD_RE = re.compile(r"^[a-z0-9_-]+$", re.I)
_FAILING = frozenset({"fail", "permerror"})
_VERIFYING_KEYS = {"spf": ("smtp.mailfrom", "smtp.from"), "dkim": ("header.d", "header.i")}

# One word of a clause: its text (quoted parts unquoted) and the index of its
# first "=" that was not inside quotes (-1: none).
_Word = tuple[str, int]


class _Malformed(ValueError):
    pass


def _clauses(value: str, quotes_in_comments: bool) -> list[list[_Word]]:
    """The ``;``-separated clauses of a field value, each a list of words."""
    text = value.replace("\r", " ").replace("\n", " ")
    clauses: list[list[_Word]] = [[]]
    word: list[str] = []
    eq = -1
    started = False

    def flush() -> None:
        nonlocal word, eq, started
        if started:
            clauses[-1].append(("".join(word), eq))
        word, eq, started = [], -1, False

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "(":
            flush()
            i = read_comment(text, i, quotes=quotes_in_comments)[0]
            continue
        if ch == ")":
            raise _Malformed("unbalanced ')'")
        if ch == '"':
            i, content = read_quoted(text, i)
            word.append(content)
            started = True
            continue
        if ch == ";":
            flush()
            clauses.append([])
        elif ch.isspace():
            flush()
        else:
            if ch == "=" and eq < 0:
                eq = sum(len(w) for w in word)
            word.append(ch)
            started = True
        i += 1
    flush()
    return clauses


def _pairs(words: list[_Word]) -> list[tuple[str, str | None]]:
    """``key=value`` pairs (whitespace allowed around "="), bare words as (word, None).

    Only the first unquoted "=" of a word separates: an address's local part may
    hold "=" too (``smtp.mailfrom=victim.com=x@evil.example`` is about evil.example).
    """
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        text, eq = words[i]
        i += 1
        if eq < 0 and i < len(words) and words[i][1] == 0:  # "key =value" / "key = value"
            key, value = text, words[i][0][1:]
            i += 1
        elif eq < 0:
            out.append((text, None))
            continue
        else:
            key, value = text[:eq], text[eq + 1 :]
        if not value and i < len(words):  # "key= value"
            value = words[i][0]
            i += 1
        out.append((key, value))
    return out


@dataclass(frozen=True)
class AuthResult:
    method: str  # lower case: "dmarc", "spf", "dkim", ...
    result: str  # lower case: "pass", "fail", ...
    props: dict[str, str]  # lower-case property names; a repeated one is left out


@dataclass(frozen=True)
class ParsedAuthResults:
    authserv_id: str  # lower case; "" when the field has none (Microsoft's style)
    results: tuple[AuthResult, ...]


def _parse(value: str, quotes_in_comments: bool) -> ParsedAuthResults:
    clauses = _clauses(value, quotes_in_comments)
    authserv_id = ""
    first = clauses[0]
    if first and not any(eq >= 0 or text.startswith("=") for text, eq in first):
        authserv_id = first[0][0].lower()  # authserv-id [version]
        clauses = clauses[1:]
    results: list[AuthResult] = []
    for clause in clauses:
        pairs = _pairs(clause)
        if not pairs or pairs[0][1] is None:
            continue  # "none", or an empty clause
        method, result = pairs[0]
        m = _METHOD_RE.match(method)
        if m is None or result is None or not _KEYWORD_RE.match(result):
            continue
        props: dict[str, str] = {}
        repeated: set[str] = set()
        for key, val in pairs[1:]:
            if val is None:
                continue
            key = key.lower()
            if key in props:
                repeated.add(key)
            props[key] = val
        for key in repeated:
            del props[key]
        results.append(AuthResult(m.group(1).lower(), result.lower(), props))
    return ParsedAuthResults(authserv_id, tuple(results))


def parse_auth_results(value: str) -> ParsedAuthResults | None:
    """One Authentication-Results field value, or None when it cannot be read unambiguously.

    Encoded words are *not* decoded (RFC 8601 has none; decoding would turn echoed
    ``=?utf-8?q?=3B?=`` into a clause separator). The value is tokenized twice:
    once by RFC 5322 rules, once also treating double quotes inside comments as
    quoting. A field on which the two disagree, or that is malformed (an
    unterminated comment or quoted string, a stray ``)``), was made ambiguous by
    echoed text and is not read at all.
    """
    try:
        strict = _parse(value, quotes_in_comments=False)
        lenient = _parse(value, quotes_in_comments=True)
    except (_Malformed, Unterminated):
        return None
    return strict if strict == lenient else None


def authserv_id_of(value: str) -> tuple[str, str]:
    """Split a header value into (authserv-id, rest). Microsoft omits the id: ("", value)."""
    parsed = parse_auth_results(value)
    if parsed is not None:
        authserv_id = parsed.authserv_id
    else:  # unreadable: the first word, for display only (never trusted for a verdict)
        head = value.split(";", 1)[0].split()
        authserv_id = head[0].lower() if head and "=" not in head[0] else ""
    if not authserv_id:
        return "", value
    return authserv_id, value.split(";", 1)[1] if ";" in value else ""


def authserv_id_trusted(authserv_id: str, trusted: Iterable[str]) -> bool:
    """Is ``authserv_id`` in ``trusted`` (exact, or under a ``*.domain`` entry)?"""
    for entry in trusted:
        item = entry.strip().lower()
        if not item:
            continue
        if item == authserv_id:
            return True
        if item.startswith("*.") and authserv_id.endswith(item[1:]):
            return True
    return False


def _domain_of(value: str) -> str:
    return ascii_domain(value.strip().strip("<>").rpartition("@")[2].strip("."))


@functools.cache
def _psl() -> PublicSuffixList:
    from publicsuffixlist import PublicSuffixList  # the bundled list: ~40 ms, once

    return PublicSuffixList()


def organizational_domain(domain: str) -> str | None:
    """The registrable domain (RFC 7489 3.2) of ``domain``; None for a public suffix itself."""
    name = domain.strip().strip(".").lower()
    if not name or ".." in name:
        return None
    found = _psl().privatesuffix(name)
    return found if isinstance(found, str) else None


def _aligned(domain: str, from_domain: str) -> bool:
    """DMARC alignment: the same domain (strict), or the same organizational domain (relaxed).

    Two different names under a public suffix (``a.github.io``, ``b.github.io``;
    ``x.co.uk``, ``y.co.uk``) are not aligned: anyone can register there.
    """
    d = _domain_of(domain)
    f = from_domain.strip().strip(".").lower()
    if not d or not f:
        return False
    if d == f:
        return True
    org = organizational_domain(d)
    return org is not None and org == organizational_domain(f)


@dataclass(frozen=True)
class AuthVerdict:
    verified: bool | None
    authserv_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class ProviderField:
    """The topmost Authentication-Results field: the only one ever believed.

    ``entry`` is what ``trusted_authserv_ids`` must contain for it to be believed
    (its authserv-id, or ``"@none"`` for a field without one); None when the
    field cannot be read unambiguously (then no entry makes it count).
    ``ignored`` is how many fields below it were present and not read.
    """

    value: str
    parsed: ParsedAuthResults | None
    entry: str | None
    ignored: int

    def trusted_by(self, trusted: Iterable[str]) -> bool:
        """Would this field be believed under ``trusted``? (the one trust rule)"""
        if self.parsed is None:
            return False
        items = [t.strip().lower() for t in trusted if t.strip()]
        if not self.parsed.authserv_id:
            return NO_ID in items
        return authserv_id_trusted(self.parsed.authserv_id, items)


def provider_field(fields: Sequence[str]) -> ProviderField | None:
    """The field our provider wrote, i.e. the topmost one (None: no field at all).

    A provider *prepends* its field when the mail arrives, so it is on top;
    every field below it was in the message before (a sender can plant any
    text there, trusted ids included) and counts for nothing.
    """
    if not fields:
        return None
    value = fields[0]
    parsed = parse_auth_results(value)
    entry = None if parsed is None else (parsed.authserv_id or NO_ID)
    return ProviderField(value, parsed, entry, len(fields) - 1)


def authserv_ids(values: Iterable[str]) -> list[str]:
    """The authserv-ids these field values name (fields without one name none).

    For explaining only (e.g. which ids lower, ignored fields claim); trust is
    decided by :func:`provider_field` and :meth:`ProviderField.trusted_by`.
    """
    return [aid for aid in (authserv_id_of(v)[0] for v in values) if aid]


def trust_line(entries: Iterable[str]) -> str:
    """The config line that trusts ``entries`` (TOML, ready to paste)."""
    unique = sorted(set(entries))
    return f"trusted_authserv_ids = [{', '.join(repr(e) for e in unique)}]"


def sender_verified(headers: Headers, from_address: str, trusted: Iterable[str]) -> AuthVerdict:
    """Whether a trusted server vouched for the From domain (see :func:`verdict`)."""
    return verdict(headers.get_all("authentication-results"), from_address, trusted)


def verdict(fields: Sequence[str], from_address: str, trusted: Iterable[str]) -> AuthVerdict:
    """Whether a trusted server vouched for the From domain, given the message's
    Authentication-Results field values in order (top first).

    The trust rule: only the topmost field (:func:`provider_field`) is read, and
    only when ``trusted`` believes it: its authserv-id is listed exactly or under
    a ``"*.example.net"`` entry, or it has no authserv-id (Microsoft's style)
    and ``trusted`` contains ``"@none"``.

    In that field, per method, only a result the field states once counts: a
    method stated twice (a server echoing sender text may have been made to
    "say" a second result) can never verify. Then:

    * DMARC ``fail``/``permerror`` (not about another domain) → False;
    * DMARC ``pass`` whose ``header.from`` is present and is the From domain → True;
    * SPF or DKIM ``pass`` for a domain aligned with the From domain → True;
    * SPF or DKIM ``fail``/``permerror`` for an aligned domain → False;
    * anything else (``none``, ``neutral``, ``softfail``, ``temperror``, passes for
      other domains, a field that cannot be read unambiguously) → None.

    True: verified. False: a trusted server said the check failed. None: no
    trusted server said either.
    """
    trusted = [t.strip().lower() for t in trusted if t.strip()]
    top = provider_field(fields)
    if not trusted or top is None or "@" not in from_address:
        return AuthVerdict(None)
    if top.parsed is None:
        aid = authserv_id_of(top.value)[0] or None
        return AuthVerdict(None, aid, "unreadable Authentication-Results")
    if not top.trusted_by(trusted):
        return AuthVerdict(None)
    parsed = top.parsed
    used = top.entry
    from_domain = _domain_of(from_address)
    by_method: dict[str, list[AuthResult]] = {}
    for res in parsed.results:
        if res.method in ("dmarc", "spf", "dkim"):
            by_method.setdefault(res.method, []).append(res)
    if not by_method:
        return AuthVerdict(None, used)
    dmarc = by_method.get("dmarc", [])
    for res in dmarc:
        hfrom = res.props.get("header.from")
        if res.result in _FAILING and (hfrom is None or _domain_of(hfrom) == from_domain):
            return AuthVerdict(False, used, f"dmarc={res.result}")
    if len(dmarc) == 1 and dmarc[0].result == "pass":
        hfrom = dmarc[0].props.get("header.from")
        if hfrom is not None and _domain_of(hfrom) == from_domain:
            return AuthVerdict(True, used, "dmarc=pass")
    failed = ""
    for method, keys in _VERIFYING_KEYS.items():
        found = by_method.get(method, [])
        for res in found:
            dom = next((res.props[k] for k in keys if k in res.props), None)
            if not dom or not _aligned(dom, from_domain):
                continue
            if res.result == "pass" and len(found) == 1:
                return AuthVerdict(True, used, f"{method}=pass aligned")
            if res.result in _FAILING and not failed:
                failed = f"{method}={res.result} aligned"
    if failed:
        return AuthVerdict(False, used, failed)
    ambiguous = sorted(m for m, found in by_method.items() if len(found) > 1)
    if ambiguous:
        return AuthVerdict(None, used, "repeated results: " + ", ".join(ambiguous))
    transient = sorted(
        {r.method for rs in by_method.values() for r in rs if r.result == "temperror"}
    )
    if transient:  # the provider could not check (a DNS timeout): not the sender's doing
        return AuthVerdict(None, used, TEMPERROR + ": " + ", ".join(transient))
    return AuthVerdict(None, used, "no verifying result")
