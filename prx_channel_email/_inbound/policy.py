"""Which messages the agent may see: allow-list, loop guards, authenticity.

Rate limits are not here: they defer rather than refuse (ratelimit.py, deferred.py).

Everything here works on headers alone, so mail that will be refused is refused
before its body is parsed, and oversized mail gets the same decisions.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from prx_channel_email._mail.addresses import AMBIGUOUS_SENDER as AMBIGUOUS_SENDER
from prx_channel_email._mail.addresses import NO_SENDER as NO_SENDER
from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._mail.authresults import TEMPERROR, sender_verified
from prx_channel_email._mail.charsets import decode_words
from prx_channel_email._mail.envelope import Envelope
from prx_channel_email._mail.message_ids import STAMP_HEADER, channel_stamp, is_minted
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.slices import ConfigSlice

# Reason codes (also the metric suffix: inbound.skipped.<reason>).
OWN_ADDRESS = "own_address"
OWN_MESSAGE_ID = "own_message_id"
BOUNCE = "bounce"
AUTO_SUBMITTED = "auto_submitted"
AUTO_REPLY = "auto_reply"
PRECEDENCE = "precedence_bulk"
LIST_MAIL = "list_mail"
LOOP_MARKER = "loop_marker"  # X-Loop: some system already saw this mail go round
OWN_MAIL = "own_mail"  # our own mail back with a new Message-ID (stamp or Reply-To ours)
# NO_SENDER ("no_sender") and AMBIGUOUS_SENDER ("ambiguous_sender") come from addresses.
NOT_ALLOWED = "not_allowed"
UNVERIFIED = "unverified_sender"

_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply", "auto-reply"})
_BOUNCE_LOCALPARTS = frozenset({"mailer-daemon", "postmaster"})
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-response-suppress", "x-autoresponder")
# RFC 2369/2919 fields, and what ezmlm and older list managers write instead.
_LIST_HEADERS = (
    "list-id",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-help",
    "list-owner",
    "list-archive",
    "mailing-list",
    "x-mailing-list",
)


def sender_allowed(sender: str, allowed: Iterable[str]) -> bool:
    """``allowed_senders`` semantics: exact address, ``@domain`` exactly, ``*``.

    Case is ignored for ASCII letters only (:func:`fold_address`): a look-alike
    such as the Kelvin sign never matches the ASCII letter it resembles.
    """
    addr = fold_address(sender)
    if not addr or "@" not in addr:
        return False
    domain = "@" + addr.rpartition("@")[2]
    for entry in allowed:
        item = fold_address(entry)
        if item == "*" or item == addr or (item.startswith("@") and item == domain):
            return True
    return False


def loop_reason(
    env: Envelope, own_addresses: Iterable[str], stamp: str = "", *, reply_to_us: bool = False
) -> str | None:
    """Why this mail must never reach the agent (RFC 3834 and what bots learned), or None.

    ``stamp``: the :data:`STAMP_HEADER` value this account puts on its own mail.
    ``reply_to_us``: the operator released this mail, quarantined for naming us in
    Reply-To: that one signal no longer counts (every other one still does).
    """
    h = env.headers
    own = {fold_address(a) for a in own_addresses}
    if env.sender and env.sender in own:
        return OWN_ADDRESS
    if is_minted(env.message_id):
        return OWN_MESSAGE_ID
    # Our own mail back under a new Message-ID, its Auto-Submitted stripped and
    # its From rewritten (a forwarder): our stamp survives, or the forwarder
    # points Reply-To at the original author, i.e. us. A person's reply never
    # copies our header fields, and never asks for answers to go to the bot.
    if stamp and any(" ".join(v.split()) == stamp for v in h.get_all(STAMP_HEADER)):
        return OWN_MAIL
    if env.reply_target in own and env.reply_target != env.sender and not reply_to_us:
        return OWN_MAIL
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
    for name in ("precedence", "x-precedence"):  # the X- form: older list managers
        precedence = decode_words(h.get(name)).lower().split(";")[0].strip()
        if precedence in _BULK_PRECEDENCE:
            return PRECEDENCE
    if any(name in h for name in _LIST_HEADERS):
        return LIST_MAIL
    if "x-loop" in h:
        return LOOP_MARKER
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
    # Accepted mail: where replies go (see Policy.reply_target), and the Reply-To
    # address that was passed over because it may not write to the bot.
    reply_target: str = ""
    reply_to_refused: str | None = None
    # Refused, but on a signal a person's mail can carry too, from an allowed
    # sender: quarantined (warning log, kept unread on the server) instead of
    # silently skipped. See Policy.decide.
    quarantine: bool = False


NOTHING_TRUSTED = (
    "sender_auth is 'enforce' but trusted_authserv_ids is empty, so no sender can be"
    " verified: run `prx-email doctor` for the line to paste, or set sender_auth = 'flag'"
)


@dataclass(frozen=True)
class PolicySettings(ConfigSlice):
    """What the inbound policy reads of the config (the names are EmailConfig's)."""

    account: str
    from_address: str
    own_addresses: tuple[str, ...]
    allowed_senders: tuple[str, ...]
    sender_auth: Literal["off", "flag", "enforce"]
    trusted_authserv_ids: tuple[str, ...]
    rollout_percent: float = 100.0


def describe_sender_auth(settings: EmailConfig | PolicySettings) -> tuple[bool, str]:
    """(is it a problem, one line) on what sender authenticity does under ``config``."""
    config = PolicySettings.of(settings)
    trusted = ", ".join(config.trusted_authserv_ids)
    if config.sender_auth == "off":
        return True, "sender_auth = 'off': From headers are not verified"
    if not trusted:
        if config.sender_auth == "enforce":
            return True, NOTHING_TRUSTED
        return False, "sender_auth = 'flag' with nothing trusted: sender_verified stays None"
    verb = "refusing" if config.sender_auth == "enforce" else "flagging"
    return False, f"{verb} senders not verified by {trusted}"


class Policy:
    """The inbound policy of one channel. :meth:`decide` is cheap and header-only."""

    def __init__(
        self, settings: EmailConfig | PolicySettings, clock: Callable[[], float] = time.time
    ) -> None:
        config = self.config = PolicySettings.of(settings)
        self.own = [fold_address(config.from_address), *config.own_addresses]
        self._own = {fold_address(a) for a in self.own}
        self.stamp = channel_stamp(config.account)
        self.allowed_senders: list[str] = list(config.allowed_senders)
        self._refused_unverified: set[str] = set()

    def set_runtime_senders(self, added: Iterable[str], removed: Iterable[str]) -> None:
        """Replace the host's runtime changes (``allow_sender``/``remove_sender``):
        the allow-list is the config's, minus ``removed``, plus ``added``."""
        gone = set(removed)
        merged = [e for e in self.config.allowed_senders if e not in gone]
        merged += [e for e in added if e not in merged]
        self.allowed_senders = merged

    def allows(self, sender: str) -> bool:
        """The current allow-list (config plus the host's changes) accepts ``sender``:
        asked on arrival by :meth:`decide`, and again when waiting mail is released."""
        return bool(sender) and sender_allowed(sender, self.allowed_senders)

    def _first_refusal(self, sender: str) -> bool:
        """True the first time ``sender`` is refused as unverified (bounded memory)."""
        if sender in self._refused_unverified:
            return False
        if len(self._refused_unverified) >= 10_000:
            self._refused_unverified.clear()
        self._refused_unverified.add(sender)
        return True

    def in_rollout(self, sender: str) -> bool:
        """Whether ``sender`` is in the share of senders this account serves."""
        return in_rollout(sender, self.config.rollout_percent)

    def decide(self, env: Envelope, *, record: bool = True, release: str | None = None) -> Decision:
        """Loop guards, then the allow-list, then authenticity, then the account's
        rollout share (rate limits: deferred.py).

        ``record=False`` (a look-up by the mailbox tools) decides the same way but does
        not count as the sender's first refusal, so the listener's one explanation of
        it is still logged when the listener meets it.

        ``release``: the reason this mail was quarantined, when the operator released
        it. Only that quarantine decision is set aside (see ``quarantine.py``); the
        allow-list, authenticity and every other guard decide as for new mail.
        """
        reason = loop_reason(env, self.own, self.stamp, reply_to_us=release == OWN_MAIL)
        if reason is not None:
            weak = self._weak_loop_signal(env, reason)
            return Decision(reason, quarantine=weak and self.allows(env.sender))
        if env.sender_problem is not None:
            return Decision(env.sender_problem)
        if not env.sender:
            return Decision(NO_SENDER)
        if not self.allows(env.sender):
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
                    first_for_sender=self._first_refusal(env.sender) if record else False,
                    quarantine=detail.startswith(TEMPERROR),
                )
        if not self.in_rollout(env.sender):  # allowed, but left to people for now
            return Decision(ROLLOUT, verified, f"outside rollout_percent "
                            f"({self.config.rollout_percent:g})")  # fmt: skip
        target, refused = self.reply_target(env)
        return Decision(None, verified, detail, reply_target=target, reply_to_refused=refused)

    def _weak_loop_signal(self, env: Envelope, reason: str) -> bool:
        """A loop guard that fired on a signal a person's own mail can carry.

        A person may point Reply-To at the bot; our stamp, by contrast, is never
        in a person's mail. Mail from an allowed sender refused only for the
        Reply-To is quarantined, not skipped: it is still never handed on (a loop
        must not reach the agent), but it is logged as a warning with its sender
        and subject, so it can be found.
        """
        return reason == OWN_MAIL and not env.headers.get_all(STAMP_HEADER)

    def reply_target(self, env: Envelope) -> tuple[str, str | None]:
        """Where replies to this (accepted) mail go: ``(address, passed-over Reply-To)``.

        The Reply-To only when that address may itself write to the bot (it is
        on the allow-list, runtime entries included); otherwise the From. A
        Reply-To naming a stranger would let anyone who can get one mail through
        read the agent's answers.
        """
        reply_to = env.reply_target
        if not reply_to or reply_to == env.sender:
            return env.sender, None
        # Never ourselves (a released mail that named us): that answer would come back.
        if fold_address(reply_to) not in self._own and sender_allowed(
            reply_to, self.allowed_senders
        ):
            return reply_to, None
        return env.sender, reply_to


# rollout_percent is applied in basis points of this hash's range.
_ROLLOUT_BUCKETS = 10_000
ROLLOUT = "rollout"


def in_rollout(sender: str, percent: float) -> bool:
    """``sender`` falls in the first ``percent`` of a stable hash of the folded address:
    the same answer on every account, machine and restart, and raising the percentage
    keeps everyone who was in (the first N buckets grow, none move)."""
    if percent >= 100:
        return True
    digest = hashlib.sha256(fold_address(sender).encode("utf-8", "surrogatepass")).digest()
    bucket = int.from_bytes(digest[:8], "big") % _ROLLOUT_BUCKETS
    return bucket < round(percent * _ROLLOUT_BUCKETS / 100)
