"""Message-ID helpers shared by the inbound and outbound paths.

IDs this channel mints carry a fixed marker in their left part, so the loop guard
can recognise our own mail coming back without consulting any state.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

MINTED_MARKER = ".prxmail"
_ID_RE = re.compile(r"<[^<>\s]+>")


STAMP_HEADER = "X-PRX-Channel"


def channel_stamp(account: str) -> str:
    """The value of :data:`STAMP_HEADER` on every mail this account sends.

    Our own mail coming back with a new Message-ID and its RFC 3834 headers
    stripped (an auto-forward, a redirect) still carries it, so the loop guard
    knows it. It only recognises, it proves nothing: whoever copies it into a
    mail only gets that mail ignored. Per account, so two bots can tell their
    mail apart.
    """
    digest = hashlib.sha256(f"prx-channel-email\0{account}".encode()).hexdigest()
    return f"v1; {digest[:24]}"


def mint_message_id(from_address: str) -> str:
    """A new globally unique Message-ID on the from_address domain."""
    domain = from_address.rpartition("@")[2] or "localhost"
    stamp = format(time.time_ns() // 1_000_000, "x")
    return f"<{stamp}.{secrets.token_hex(8)}{MINTED_MARKER}@{domain.lower()}>"


def is_minted(message_id: str | None) -> bool:
    """True when this channel (any instance of it) minted ``message_id``."""
    if not message_id:
        return False
    left = message_id.strip().strip("<>").rpartition("@")[0]
    return left.endswith(MINTED_MARKER)


def minted_at(message_id: str | None) -> float | None:
    """When this channel minted ``message_id`` (Unix seconds), or None when it did not.

    Anyone can write an id of this shape, so the time is a claim, not a proof: the
    loop guard does not trust it (it asks the outbox when the reply was stored).
    """
    if not is_minted(message_id):
        return None
    stamp = str(message_id).strip().strip("<>").partition(".")[0]
    try:
        return int(stamp, 16) / 1000.0
    except ValueError:
        return None


def synthetic_message_id(raw: bytes) -> str:
    """A stable stand-in for a missing Message-ID: the same bytes give the same id."""
    return f"<sha256-{hashlib.sha256(raw).hexdigest()[:32]}@prx-email.invalid>"


def parse_id_list(value: str | None) -> list[str]:
    """The Message-IDs of a References or In-Reply-To header, in order, deduplicated."""
    if not value:
        return []
    seen: set[str] = set()
    out: list[str] = []
    for mid in _ID_RE.findall(value):
        if mid not in seen:
            seen.add(mid)
            out.append(mid)
    return out


def normalize_id(value: str | None) -> str | None:
    """One Message-ID with angle brackets, or None when the header holds none."""
    if not value:
        return None
    ids = parse_id_list(value)
    if ids:
        return ids[0]
    bare = value.strip()
    if bare and " " not in bare and "@" in bare:
        return f"<{bare.strip('<>')}>"
    return None
