"""Opaque paging cursors: where the next page starts, bound to the search it came from.

A page walks the searched mailboxes in order, each from its highest UID down. The
cursor names the mailbox and the UID the next page starts below, plus that
mailbox's UIDVALIDITY: UIDs never move, so pages have no duplicates and no gaps
while mail comes and goes (new mail has higher UIDs and belongs to a new search).

It is signed with a key that lives as long as the tools object, and bound to the
search's arguments: a cursor that was edited, or that belongs to another search,
is refused (``invalid_cursor``) instead of silently paging something else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from prx_channel_email.errors import ChannelError

_VERSION = 1


@dataclass(frozen=True)
class Position:
    """Mailbox ``index`` of the search's list; start below UID ``below`` (0: from the top)."""

    index: int = 0
    uidvalidity: int = 0
    below: int = 0


def search_digest(arguments: dict[str, Any]) -> str:
    """A short fingerprint of a search's arguments (the cursor is only valid for them)."""
    text = json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(key: bytes, digest: str, pos: Position) -> str:
    payload = json.dumps(
        [_VERSION, digest, pos.index, pos.uidvalidity, pos.below], separators=(",", ":")
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(payload + mac).decode().rstrip("=")


def invalid() -> ChannelError:
    return ChannelError(
        "this cursor is not valid for this search (edited, from another search, or from"
        " before a restart): search again without a cursor",
        code="invalid_cursor",
    )


def decode(key: bytes, digest: str, cursor: str) -> Position:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (ValueError, TypeError):
        raise invalid() from None
    payload, mac = raw[:-12], raw[-12:]
    if len(raw) <= 12 or not hmac.compare_digest(
        mac, hmac.new(key, payload, hashlib.sha256).digest()[:12]
    ):
        raise invalid()
    try:
        version, found, index, uidvalidity, below = json.loads(payload)
    except (ValueError, TypeError):
        raise invalid() from None
    if version != _VERSION or found != digest:
        raise invalid()
    return Position(int(index), int(uidvalidity), int(below))
