"""Which messages the agent may see: allow-list, loop guards, authenticity.

Rate limits are not here: they defer rather than refuse (ratelimit.py, deferred.py).

Everything here works on headers alone, so mail that will be refused is refused
before its body is parsed, and oversized mail gets the same decisions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .addresses import AMBIGUOUS_SENDER as AMBIGUOUS_SENDER
from .addresses import NO_SENDER as NO_SENDER
from .addresses import Unterminated, read_comment, read_quoted
from .charsets import decode_words
from .config import EmailConfig
from .envelope import Envelope
from .headers import Headers
from .message_ids import is_minted

# Reason codes (also the metric suffix: inbound.skipped.<reason>).
OWN_ADDRESS = "own_address"
OWN_MESSAGE_ID = "own_message_id"
BOUNCE = "bounce"
AUTO_SUBMITTED = "auto_submitted"
AUTO_REPLY = "auto_reply"
PRECEDENCE = "precedence_bulk"
LIST_MAIL = "list_mail"
# NO_SENDER ("no_sender") and AMBIGUOUS_SENDER ("ambiguous_sender") come from addresses.
NOT_ALLOWED = "not_allowed"
UNVERIFIED = "unverified_sender"

_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply", "auto-reply"})
_BOUNCE_LOCALPARTS = frozenset({"mailer-daemon", "postmaster"})
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-response-suppress", "x-autoresponder")
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post")


def sender_allowed(sender: str, allowed: Iterable[str]) -> bool:
    """``allowed_senders`` semantics: exact address (any case), ``@domain`` exactly, ``*``."""
    addr = sender.strip().lower()
    if not addr or "@" not in addr:
        return False
    domain = "@" + addr.rpartition("@")[2]
    for entry in allowed:
        item = entry.strip().lower()
        if item == "*" or item == addr or (item.startswith("@") and item == domain):
            return True
    return False


def loop_reason(env: Envelope, own_addresses: Iterable[str]) -> str | None:
    """Why this mail must never reach the agent (RFC 3834 and what bots learned), or None."""
    h = env.headers
    own = {a.strip().lower() for a in own_addresses}
    if env.sender and env.sender in own:
        return OWN_ADDRESS
    if is_minted(env.message_id):
        return OWN_MESSAGE_ID
    # A bounce: null reverse-path, or sent by the mail system itself.
    return_path = h.get("return-path")
    if return_path is not None and "".join(decode_words(return_path).split()) in ("<>", ""):
        return BOUNCE
    local = env.sender.partition("@")[0]
    if local in _BOUNCE_LOCALPARTS:
        return BOUNCE
    ctype = (h.get("content-type") or "").lower()
    if "multipart/report" in ctype and "delivery-status" in ctype:
        return BOUNCE
    auto = decode_words(h.get("auto-submitted")).lower()
    if auto and auto.split(";")[0].strip() != "no":
        return AUTO_SUBMITTED
    if any(name in h for name in _AUTO_HEADERS):
        return AUTO_REPLY
    precedence = decode_words(h.get("precedence")).lower().split(";")[0].strip()
    if precedence in _BULK_PRECEDENCE:
        return PRECEDENCE
    if any(name in h for name in _LIST_HEADERS):
        return LIST_MAIL
    # Our own mail quoted back (References carry an id we minted) is fine: that
    # is a normal reply. Only the message's own id marks our mail returning.
    return None


# --- sender authenticity (RFC 8601 Authentication-Results) ---------------------

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
    return value.strip().strip("<>").rpartition("@")[2].strip(".").lower()


def _aligned(domain: str, from_domain: str) -> bool:
    """Relaxed alignment, approximated without the Public Suffix List: the same
    domain, or one a subdomain of the other (never a bare TLD like ``com``)."""
    d = _domain_of(domain)
    f = from_domain.lower()
    if d == f:
        return bool(d)
    return ("." in d and f.endswith("." + d)) or ("." in f and d.endswith("." + f))


@dataclass(frozen=True)
class AuthVerdict:
    verified: bool | None
    authserv_id: str | None = None
    detail: str = ""


def sender_verified(headers: Headers, from_address: str, trusted: Iterable[str]) -> AuthVerdict:
    """Whether a trusted server vouched for the From domain.

    The trust rule: our provider *prepends* its Authentication-Results field when
    the mail arrives, so it is the topmost one. Only that topmost field is read,
    and only when its authserv-id is trusted; every field below it was already in
    the message when the provider received it (a sender can plant any text
    there, trusted ids included) and counts for nothing. A field without an
    authserv-id (Microsoft's style) is trusted only when ``trusted`` contains the
    entry ``"@none"``. An entry ``"*.example.net"`` trusts every subdomain.

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
    fields = headers.get_all("authentication-results")
    if not trusted or not fields or "@" not in from_address:
        return AuthVerdict(None)
    parsed = parse_auth_results(fields[0])
    if parsed is None:
        aid = authserv_id_of(fields[0])[0] or None
        return AuthVerdict(None, aid, "unreadable Authentication-Results")
    authserv_id = parsed.authserv_id
    if not (authserv_id and authserv_id_trusted(authserv_id, trusted)) and not (
        not authserv_id and "@none" in trusted
    ):
        return AuthVerdict(None)
    used = authserv_id or "@none"
    from_domain = from_address.rpartition("@")[2].lower()
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
    return AuthVerdict(None, used, "no verifying result")


@dataclass(frozen=True)
class Decision:
    reason: str | None  # None: deliver
    sender_verified: bool | None = None
    detail: str = ""
    # For refusals that repeat for every mail of a sender (unverified): True the
    # first time this sender is refused for it, so the log explains it once.
    first_for_sender: bool = True


NOTHING_TRUSTED = (
    "sender_auth is 'enforce' but trusted_authserv_ids is empty, so no sender can be"
    " verified: run `prx-email doctor` for the line to paste, or set sender_auth = 'flag'"
)


class Policy:
    """The inbound policy of one channel. :meth:`decide` is cheap and header-only."""

    def __init__(self, config: EmailConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.own = [config.from_address.lower(), *config.own_addresses]
        self._refused_unverified: set[str] = set()

    def _first_refusal(self, sender: str) -> bool:
        """True the first time ``sender`` is refused as unverified (bounded memory)."""
        if sender in self._refused_unverified:
            return False
        if len(self._refused_unverified) >= 10_000:
            self._refused_unverified.clear()
        self._refused_unverified.add(sender)
        return True

    def decide(self, env: Envelope) -> Decision:
        """Loop guards, then the allow-list, then authenticity (rate limits: deferred.py)."""
        reason = loop_reason(env, self.own)
        if reason is not None:
            return Decision(reason)
        if env.sender_problem is not None:
            return Decision(env.sender_problem)
        if not env.sender:
            return Decision(NO_SENDER)
        if not sender_allowed(env.sender, self.config.allowed_senders):
            return Decision(NOT_ALLOWED)
        verified: bool | None = None
        detail = ""
        if self.config.sender_auth != "off":
            verdict = sender_verified(env.headers, env.sender, self.config.trusted_authserv_ids)
            verified, detail = verdict.verified, verdict.detail
            if self.config.sender_auth == "enforce" and verified is not True:
                if not self.config.trusted_authserv_ids:
                    detail = NOTHING_TRUSTED
                return Decision(
                    UNVERIFIED,
                    verified,
                    detail or "no trusted result",
                    first_for_sender=self._first_refusal(env.sender),
                )
        return Decision(None, verified, detail)
