"""The durable state, behind one interface.

Everything outside this package reaches the state through :class:`Storage` (and
the per-account :class:`OutboxStore` it hands out), with the frozen dataclasses of
:mod:`.interface` as the only currency. Backends live in subpackages
(``sqlite/`` today); :func:`open_storage` picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prx_channel_email._storage.files import low_space, make_private_dir, private_file
from prx_channel_email._storage.interface import (
    ACCEPTED,
    DEFERRED,
    DELIVERED,
    EXHAUSTED_PREFIX,
    QUARANTINED,
    REFUSED_ID_CHARS,
    REJECTED,
    RELEASE_DONE,
    RELEASE_FAILED,
    RELEASE_PENDING,
    CopiesOf,
    Cursor,
    Deferral,
    HandoffBatch,
    InFlight,
    InFlightRow,
    LeaseLost,
    LedgerEntry,
    Mailbox,
    MailKey,
    NewRow,
    OutboxEntry,
    OutboxRow,
    OutboxStore,
    QuarantinedMail,
    Record,
    Release,
    ReleaseRequest,
    SenderChanges,
    Storage,
    Stored,
    TokenRecord,
    TokenStore,
    WaitingRow,
)
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._storage.sqlite.store import state_exists as _sqlite_state_exists

if TYPE_CHECKING:
    from prx_channel_email.config import EmailConfig

__all__ = [
    "ACCEPTED",
    "DEFERRED",
    "DELIVERED",
    "EXHAUSTED_PREFIX",
    "QUARANTINED",
    "REFUSED_ID_CHARS",
    "REJECTED",
    "RELEASE_DONE",
    "RELEASE_FAILED",
    "RELEASE_PENDING",
    "CopiesOf",
    "Cursor",
    "Deferral",
    "HandoffBatch",
    "InFlight",
    "InFlightRow",
    "LeaseLost",
    "LedgerEntry",
    "MailKey",
    "Mailbox",
    "NewRow",
    "OutboxEntry",
    "OutboxRow",
    "OutboxStore",
    "QuarantinedMail",
    "Record",
    "Release",
    "ReleaseRequest",
    "SenderChanges",
    "Storage",
    "Stored",
    "TokenRecord",
    "TokenStore",
    "WaitingRow",
    "low_space",
    "make_private_dir",
    "open_storage",
    "private_file",
    "state_exists",
    "storage_of",
]


def open_storage(state_dir: Path, *, url: str | None = None) -> Storage:
    """The storage for this state (not opened yet: ``await storage.open()`` or
    ``async with``). ``url`` None: SQLite in ``state_dir``; ``postgresql://...``: the
    shared PostgreSQL backend (the ``postgres`` extra)."""
    if url is None:
        return StateStore(state_dir)
    if url.split(":", 1)[0].lower() in ("postgresql", "postgres"):
        from prx_channel_email._storage.postgres.store import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"no storage backend for {url.split(':', 1)[0]!r} URLs")


def state_exists(state_dir: Path, *, url: str | None = None) -> bool:
    """True when there is state to open (something was ever stored there)."""
    if url is not None:
        return True
    return _sqlite_state_exists(state_dir)


def storage_of(config: EmailConfig) -> Storage:
    """The storage a config names: PostgreSQL when it sets ``state_url``, else SQLite in
    its ``state_dir`` (not opened yet). Every user of the state (the channel, the CLI's
    outbox and auth commands, the token store) opens it through here, so they agree."""
    url = config.state_url.get_secret_value() if config.state_url is not None else None
    return open_storage(config.state_dir, url=url)
