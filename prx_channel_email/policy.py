"""Which messages the agent may see: allow-list, loop guards, authenticity.

Rate limits are not here: they defer rather than refuse (ratelimit.py, deferred.py).

Everything here works on headers alone, so mail that will be refused is refused
before its body is parsed, and oversized mail gets the same decisions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .addresses import AMBIGUOUS_SENDER as AMBIGUOUS_SENDER
from .addresses import NO_SENDER as NO_SENDER
from .authresults import sender_verified
from .charsets import decode_words
from .config import EmailConfig
from .envelope import Envelope
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
        self.allowed_senders: list[str] = list(config.allowed_senders)
        self._refused_unverified: set[str] = set()

    def set_runtime_senders(self, added: Iterable[str], removed: Iterable[str]) -> None:
        """Replace the host's runtime changes (``allow_sender``/``remove_sender``):
        the allow-list is the config's, minus ``removed``, plus ``added``."""
        gone = set(removed)
        merged = [e for e in self.config.allowed_senders if e not in gone]
        merged += [e for e in added if e not in merged]
        self.allowed_senders = merged

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
        if not sender_allowed(env.sender, self.allowed_senders):
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
