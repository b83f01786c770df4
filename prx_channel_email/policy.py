"""Which messages the agent may see: allow-list, loop guards, rate limit, authenticity.

Everything here works on headers alone, so mail that will be refused is refused
before its body is parsed, and oversized mail gets the same decisions.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import EmailConfig
from .message_ids import is_minted
from .normalize import Envelope, Headers, decode_words

# Reason codes (also the metric suffix: inbound.skipped.<reason>).
OWN_ADDRESS = "own_address"
OWN_MESSAGE_ID = "own_message_id"
BOUNCE = "bounce"
AUTO_SUBMITTED = "auto_submitted"
AUTO_REPLY = "auto_reply"
PRECEDENCE = "precedence_bulk"
LIST_MAIL = "list_mail"
NO_SENDER = "no_sender"
NOT_ALLOWED = "not_allowed"
UNVERIFIED = "unverified_sender"
RATE_LIMITED = "rate_limited"

_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply", "auto-reply"})
_BOUNCE_LOCALPARTS = frozenset({"mailer-daemon", "postmaster"})
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-response-suppress", "x-autoresponder")
_LIST_HEADERS = ("list-id", "list-unsubscribe", "list-post")
_COMMENT_RE = re.compile(r"\([^()]*\)")
_RESULT_RE = re.compile(r"^\s*([a-z0-9_-]+)\s*=\s*([a-z0-9_-]+)(.*)$", re.I | re.S)
_PROP_RE = re.compile(r"\b(header\.from|header\.d|header\.i|smtp\.mailfrom|smtp\.from)\s*=\s*(\S+)")


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


def authserv_id_of(value: str) -> tuple[str, str]:
    """Split a header value into (authserv-id, rest). Microsoft omits the id: ("", value)."""
    text = _COMMENT_RE.sub(" ", decode_words(value))
    head, sep, rest = text.partition(";")
    token = head.strip().split()[0].lower() if head.strip() else ""
    if "=" in token or (not sep and "=" in head):
        return "", text  # no authserv-id: the value starts with a result
    return token, rest


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


def _aligned(domain: str, from_domain: str) -> bool:
    """Relaxed alignment, approximated without the Public Suffix List: the same
    domain, or one a subdomain of the other (never a bare TLD like ``com``)."""
    d = domain.strip().strip("<>").rpartition("@")[2].strip(".").lower()
    f = from_domain.lower()
    if d == f:
        return bool(d)
    return ("." in d and f.endswith("." + d)) or ("." in f and d.endswith("." + f))


# Older names, still imported by doctor.py.


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

    In that field: a DMARC result of pass (for the From domain) or fail decides.
    Otherwise SPF or DKIM passing for a domain aligned with the From domain
    verifies. True: verified. False: the field reports results and none passes.
    None: no trusted field on top, or it holds no DMARC/SPF/DKIM result.
    """
    trusted = [t.strip().lower() for t in trusted if t.strip()]
    fields = headers.get_all("authentication-results")
    if not trusted or not fields or "@" not in from_address:
        return AuthVerdict(None)
    authserv_id, rest = authserv_id_of(fields[0])
    if not (authserv_id and authserv_id_trusted(authserv_id, trusted)) and not (
        not authserv_id and "@none" in trusted
    ):
        return AuthVerdict(None)
    used = authserv_id or "@none"
    from_domain = from_address.rpartition("@")[2].lower()
    results: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for clause in rest.split(";"):
        m = _RESULT_RE.match(clause)
        if m and m.group(1).lower() in ("dmarc", "spf", "dkim"):
            props = {k.lower(): v.strip(";,") for k, v in _PROP_RE.findall(m.group(3))}
            results.setdefault(m.group(1).lower(), []).append((m.group(2).lower(), props))
    if not results:
        return AuthVerdict(None, used)
    for result, props in results.get("dmarc", []):
        hfrom = props.get("header.from")
        if hfrom is not None and not _aligned(hfrom, from_domain):
            continue  # a verdict about some other domain
        if result == "pass":
            return AuthVerdict(True, used, "dmarc=pass")
        if result == "fail":
            return AuthVerdict(False, used, "dmarc=fail")
    for method, keys in (
        ("spf", ("smtp.mailfrom", "smtp.from")),
        ("dkim", ("header.d", "header.i")),
    ):
        for result, props in results.get(method, []):
            dom = next((props[k] for k in keys if k in props), None)
            if result == "pass" and dom and _aligned(dom, from_domain):
                return AuthVerdict(True, used, f"{method}=pass aligned")
    return AuthVerdict(False, used, "no aligned pass")


class RateLimiter:
    """At most ``count`` deliveries per sender in any ``window`` seconds (in memory)."""

    def __init__(self, count: int, window: float, clock: Callable[[], float] = time.time) -> None:
        self.count = count
        self.window = window
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def _recent(self, sender: str) -> deque[float]:
        now = self.clock()
        stamps = self._seen.setdefault(sender, deque())
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        return stamps

    def allows(self, sender: str) -> bool:
        return len(self._recent(sender)) < self.count

    def note(self, sender: str) -> None:
        self._recent(sender).append(self.clock())
        if len(self._seen) > 10_000:  # forget senders that went quiet
            for key in [k for k, v in self._seen.items() if not v]:
                del self._seen[key]


@dataclass(frozen=True)
class Decision:
    reason: str | None  # None: deliver
    sender_verified: bool | None = None
    detail: str = ""


class Policy:
    """The inbound policy of one channel. :meth:`decide` is cheap and header-only."""

    def __init__(self, config: EmailConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.own = [config.from_address.lower(), *config.own_addresses]
        self.rate = RateLimiter(config.rate_limit_count, config.rate_limit_window_secs, clock)

    def decide(self, env: Envelope) -> Decision:
        """Loop guards, then the allow-list, then authenticity, then the rate limit.

        Does not count the message against the rate limit: call :meth:`delivered`
        once it is actually handed on.
        """
        reason = loop_reason(env, self.own)
        if reason is not None:
            return Decision(reason)
        if not env.sender:
            return Decision(NO_SENDER)
        if not sender_allowed(env.sender, self.config.allowed_senders):
            return Decision(NOT_ALLOWED)
        verified: bool | None = None
        detail = ""
        if self.config.sender_auth != "off":
            verdict = sender_verified(env.headers, env.sender, self.config.trusted_authserv_ids)
            verified, detail = verdict.verified, verdict.detail
            if (
                self.config.sender_auth == "enforce"
                and self.config.trusted_authserv_ids
                and verified is not True
            ):
                return Decision(UNVERIFIED, verified, detail or "no trusted result")
        if not self.rate.allows(env.sender):
            return Decision(RATE_LIMITED, verified)
        return Decision(None, verified, detail)

    def delivered(self, env: Envelope) -> None:
        self.rate.note(env.sender)
