"""The storage interface: every state operation the channel needs, as data in and out.

Callers (the sync engine, the hand-off ledger, deferred mail, the outbox, the
channel, the CLI) see only this module: frozen dataclasses for what they write
and read, and the :class:`Storage` / :class:`OutboxStore` protocols for the
operations. No connection, no SQL, no row ids of a backend leak through it, so a
second backend (PostgreSQL) implements the same protocols and runs the same
contract suite (``tests/test_storage_contract.py``).

Keys (what identifies a row):

* per mailbox (account, folder): the UID cursor;
* per received mail, :class:`MailKey` (account, folder, UIDVALIDITY, UID): its
  ledger row, its in-flight row and its deferred row. The Message-ID is an
  attribute (threading; a *true copy* is the same Message-ID AND the same
  sender), never the identity of a row: two senders using one Message-ID are
  two mails;
* per account: outbox rows, rate history (read from the ledger and in-flight
  rows), runtime senders, the OAuth token record.

Every method is one transaction: all of it is durable when it returns, none of it
when it raises. A storage failure raises :class:`~prx_channel_email.errors.StorageError`
with a code (``storage_full``, ``storage_readonly``, ``storage_error``). Callers
change their memory only after a method returned (never from inside one).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from prx_channel_email.errors import StorageError
from prx_channel_email.models import PackedMessage


class LeaseLost(StorageError):
    """A write for a mailbox whose lease this replica no longer holds was refused
    (nothing of it was written): stop serving that mailbox. Only backends shared by
    replicas raise it."""

    code = "lease_lost"


# --- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mailbox:
    """One watched folder of one account: the unit a cursor, in-flight and deferred
    mail belong to."""

    account: str
    folder: str


@dataclass(frozen=True)
class MailKey:
    """The identity of one received mail: where it is and its UID there."""

    account: str
    folder: str
    uidvalidity: int
    uid: int

    @property
    def mailbox(self) -> Mailbox:
        return Mailbox(self.account, self.folder)


# --- inbound ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """The UIDVALIDITY we know and the highest UID handed on (or decided)."""

    uidvalidity: int
    last_uid: int
    # When the cursor was last written (Unix time); 0.0 when not read from the store.
    updated_at: float = 0.0


@dataclass(frozen=True)
class LedgerEntry:
    """What the outbound side needs to thread a reply onto a received message.

    ``key`` names the mail the entry is about (None only for an entry not yet
    tied to a mail, e.g. one the pipeline built before the sync engine keyed it).
    """

    message_id: str
    sender: str
    reply_target: str
    subject: str
    thread_ts: str
    references: list[str]
    received_at: float
    key: MailKey | None = None


#: Ledger outcomes.
DELIVERED = "delivered"  # handed on and settled (handled for good)
DEFERRED = "deferred"  # accepted, waiting in the deferred rows (rate limit / loop guard)
REJECTED = "rejected"  # refused by the policy
QUARANTINED = "quarantined"  # unparseable or held by the policy
#: Outcomes of mail that was accepted (handed on, or waiting to be).
ACCEPTED = (DELIVERED, DEFERRED)

#: A refused mail's Message-ID is stored cut to this many characters. Nothing reads it
#: back (refused mail is no copy of anything and no reply parent; the cursor, not the
#: ledger, keeps it from being fetched again), and a stranger's 8 KB id cost its size
#: twice per mail (the row and the Message-ID index).
REFUSED_ID_CHARS = 256


def ledger_id(message_id: str, outcome: str) -> str:
    """The Message-ID as a ledger row of ``outcome`` keeps it (every backend writes this)."""
    return message_id[:REFUSED_ID_CHARS] if outcome == REJECTED else message_id


@dataclass(frozen=True)
class Record:
    """A decision about one mail that is not a hand-off: refused, quarantined."""

    key: MailKey
    message_id: str
    outcome: str
    reason: str | None = None
    entry: LedgerEntry | None = None


@dataclass(frozen=True)
class InFlight:
    """A mail about to be put on the host's queue: handed on again after a restart
    until settled. ``message`` is the ChannelMessage in its stored form
    (:func:`~prx_channel_email.models.pack_message`)."""

    key: MailKey
    entry: LedgerEntry
    message: str | PackedMessage


@dataclass(frozen=True)
class Deferral:
    """An accepted mail kept back (rate limit, loop guard): its ledger row becomes
    ``deferred`` and the message waits in the store, in ``seq`` order."""

    key: MailKey
    entry: LedgerEntry
    seq: int
    reason: str
    arrived_at: float
    message: str | PackedMessage


@dataclass(frozen=True)
class Release:
    """A held mail goes on: its ledger row becomes ``delivered`` with ``handed_at`` (the
    time the rate limit counted), its deferred row goes (mail that waited) and its
    pending release request is done (quarantined mail the operator released)."""

    key: MailKey
    handed_at: float


@dataclass(frozen=True)
class CopiesOf:
    """Every in-flight true copy of a mail: same Message-ID and same sender."""

    account: str
    message_id: str
    sender: str


@dataclass(frozen=True)
class HandoffBatch:
    """One transaction of the hand-off (see :meth:`Storage.commit_handoff`)."""

    mailbox: Mailbox
    records: Sequence[Record] = ()
    in_flight: Sequence[InFlight] = ()
    deferrals: Sequence[Deferral] = ()
    releases: Sequence[Release] = ()
    settle: Sequence[MailKey] = ()
    # Applied in order; a move within one UIDVALIDITY never goes backwards.
    cursors: Sequence[Cursor] = ()
    # The fencing token (lease epoch) the writer holds for ``mailbox``, where a backend
    # shares state between replicas: a write under a lost or stale lease is refused
    # (StorageError, nothing written). None: no lease (a backend serving one process).
    fence: int | None = None


@dataclass(frozen=True)
class InFlightRow:
    key: MailKey
    message_id: str
    sender: str
    message: str  # the ChannelMessage as JSON


@dataclass(frozen=True)
class WaitingRow:
    """A deferred mail as the release scheduler needs it (not its message)."""

    key: MailKey
    message_id: str
    seq: int
    sender: str
    reason: str
    arrived_at: float
    thread: str


@dataclass(frozen=True)
class QuarantinedMail:
    """A mail the policy quarantined, as the operator sees it (``prx-email quarantine
    list``): never its body, which stays on the server, unread, where it was."""

    key: MailKey
    message_id: str
    sender: str
    subject: str
    reason: str
    received_at: float


#: States of a release request (:class:`ReleaseRequest`).
RELEASE_PENDING = "pending"  # asked for; the listener has not handed it on yet
RELEASE_DONE = "released"  # handed on (committed with its in-flight write)
RELEASE_FAILED = "failed"  # the listener could not (``code`` says why); may be asked again


@dataclass(frozen=True)
class ReleaseRequest:
    """The operator's durable request to hand one quarantined mail on, once.

    Written by whoever asks (the CLI in another process, the host's API call),
    carried out by the listener serving the mail's mailbox. ``reason`` is why the
    mail was quarantined; ``code`` and ``detail`` why a release failed. ``new`` is
    set only on the answer of :meth:`Storage.request_release` that recorded it.
    """

    key: MailKey
    state: str
    reason: str
    message_id: str
    sender: str
    requested_at: float
    code: str | None = None
    detail: str | None = None
    new: bool = False


# --- outbound ---------------------------------------------------------------------

#: ``last_error`` of a row that failed because its attempts ran out (every one of
#: them transient) starts with this; :meth:`OutboxStore.requeue_exhausted` revives those.
EXHAUSTED_PREFIX = "gave up after "


@dataclass(frozen=True)
class OutboxRow:
    """What an attempt needs: the envelope and the exact bytes to send."""

    id: int
    message_id: str
    mail_from: str
    recipient: str
    raw: bytes
    attempts: int


@dataclass(frozen=True)
class NewRow:
    """A composed reply about to be stored."""

    message_id: str
    mail_from: str
    recipient: str
    raw: bytes
    idempotency_key: str | None = None


@dataclass(frozen=True)
class OutboxEntry:
    """One row as the operator sees it (``prx-email outbox list``): never the body."""

    id: int
    message_id: str
    state: str
    recipient: str
    attempts: int
    last_error: str | None
    smtp_code: int | None
    created_at: float
    updated_at: float
    error_code: str | None = None


@dataclass(frozen=True)
class Stored:
    """A row :meth:`OutboxStore.insert` wrote, or the row that already held its key."""

    id: int
    message_id: str
    held: OutboxEntry | None = None  # set when the key was already in the outbox


@runtime_checkable
class OutboxStore(Protocol):
    """The outbox rows of one account. A row moves ``pending -> sending (leased) ->
    sent``, or to ``failed``. Every method is one transaction; those taking ``sent``
    first mark those rows sent in the same transaction (one commit per reply)."""

    account: str

    async def mark_sent(self, rows: Sequence[OutboxRow]) -> None: ...

    async def recover(self) -> tuple[int, int]:
        """At start: expired leases back to pending, waiting rows due now.
        Returns (rows whose lease had expired, rows waiting to be sent)."""
        ...

    async def insert(
        self, rows: Sequence[NewRow], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[list[Stored], float]:
        """Store new rows leased to this process; returns them (in ``rows`` order) and the
        lease end. A row whose idempotency key is held already is not written: its
        :class:`Stored` names the holder (checked in the same transaction)."""
        ...

    async def by_key(self, key: str) -> OutboxEntry | None: ...

    async def sent_reply(self, message_id: str) -> tuple[float, str] | None:
        """``(when stored, recipient)`` of this account's reply with ``message_id``
        (None: no reply of ours has it). The loop guard's proof that an answer answers
        a reply this channel really sent, and to whom."""
        ...

    async def claim_due(
        self, exclude: Iterable[int], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[OutboxRow, float] | None:
        """Lease the next due row, earliest due first then oldest (never one of
        ``exclude``); a row whose lease ran out counts as due."""
        ...

    async def renew_lease(
        self, row_id: int, until: float, *, sent: Sequence[OutboxRow]
    ) -> None: ...

    async def release(self, ids: Sequence[int]) -> None:
        """Rows held but not attempted go back to ``pending``, due now, attempts unchanged."""
        ...

    async def fail(
        self,
        row_id: int,
        error: str,
        *,
        code: str,
        attempts: int | None = None,
        smtp_code: int | None,
    ) -> None:
        """Failed for good; ``attempts=None`` leaves the count alone."""
        ...

    async def retry_later(
        self, row_id: int, attempts: int, delay: float, error: str, smtp_code: int | None
    ) -> None: ...

    async def next_due_in(self, exclude: Iterable[int], default: float) -> float:
        """Seconds until the next row (not in ``exclude``) is due; ``default`` when none."""
        ...

    async def pending(self) -> int:
        """How many rows wait to be sent (queued or in flight)."""
        ...

    async def requeue_exhausted(self) -> int:
        """Failed rows whose attempts ran out (only transient failures) back to pending."""
        ...

    async def requeue_ids(self, ids: Sequence[int]) -> int:
        """These failed rows back to pending, whatever the failure."""
        ...

    async def prune_sent(self, before: float) -> int:
        """Erase the text of rows sent before ``before`` so it is gone from the
        storage (not merely unreachable); returns how many."""
        ...

    async def entries(self, states: Sequence[str] = (), limit: int = 100) -> list[OutboxEntry]:
        """The newest rows first (optionally only in ``states``), without their bodies."""
        ...


# --- OAuth tokens -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenRecord:
    """What the token store holds for one account (never logged, never shown)."""

    refresh_token: str | None = None
    access_token: str | None = None
    expires_at: float | None = None  # Unix seconds
    lifetime: float | None = None  # seconds the access token was issued for
    scope: str | None = None
    seed: str | None = None  # fingerprint of the configured oauth_refresh_token it supersedes
    provider: str | None = None
    username: str | None = None
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@runtime_checkable
class TokenStore(Protocol):
    """The OAuth token record of one account.

    ``save`` replaces the record atomically and is durable when it returns (a
    rotated refresh token is never half-written). ``version`` changes whenever the
    record is replaced or deleted and costs no network: a running channel polls it
    to notice a new ``auth login`` made by another process. ``locked`` is exclusive
    between every process sharing this storage, so at most one refresh of the grant
    is in flight anywhere; a waiter gives up after ``within`` seconds with
    ``OAuthUnavailable`` (code ``oauth_store_busy``) and a cancelled waiter holds
    nothing. ``location`` names the record in messages (never its content).
    """

    account: str
    location: str

    async def load(self) -> TokenRecord | None:
        """The record, None when there is none; a ChannelError with code
        ``oauth_store_damaged`` when it cannot be read as one."""
        ...

    async def version(self) -> object | None: ...

    async def save(self, record: TokenRecord) -> None: ...

    async def delete(self) -> bool:
        """Remove the record; False when there was none."""
        ...

    def locked(self, within: float) -> AbstractAsyncContextManager[None]: ...

    async def private(self) -> bool:
        """True when nobody but this user can read the record where it is kept."""
        ...


# --- the storage ------------------------------------------------------------------


@dataclass(frozen=True)
class SenderChanges:
    """The host's runtime changes to an account's allow-list, oldest first."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@runtime_checkable
class Storage(Protocol):
    """The whole durable state of the channel (one instance serves every account).

    ``open()`` creates the state if needed and applies the schema migrations not yet
    applied (each by name, once, in its own transaction); ``migrations()`` lists the
    names applied. ``location`` names where the state lives (for messages).
    """

    location: str

    async def open(self) -> Storage: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Storage: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def migrations(self) -> list[str]:
        """Names of the schema migrations applied, in the order they were applied."""
        ...

    # cursor (per mailbox)

    async def get_cursor(self, mailbox: Mailbox) -> Cursor | None: ...

    async def set_cursor(
        self, mailbox: Mailbox, cursor: Cursor, *, fence: int | None = None
    ) -> None:
        """Within one UIDVALIDITY the cursor never goes back; a new one replaces it.
        ``fence``: as :attr:`HandoffBatch.fence`."""
        ...

    # the hand-off (per mail)

    async def commit_handoff(self, batch: HandoffBatch) -> None:
        """One transaction, in this order: settle ``settle`` (as :meth:`settle`), write
        ``records`` (ledger rows; an accepted outcome replaces a refused one for the
        same mail, never the other way round), ``in_flight`` rows (a mail already in
        flight stays as it is), ``deferrals`` (ledger ``deferred`` + waiting row; a
        mail already waiting stays as it is), ``releases`` (as :class:`Release`),
        then the ``cursors``. All of it is durable when this returns, none of it when
        it raises."""
        ...

    async def settle(self, refs: Sequence[MailKey | CopiesOf]) -> list[MailKey]:
        """Move these in-flight mails into the ledger as delivered (handled for good).
        Returns the keys that were in flight (unknown ones are ignored)."""
        ...

    async def in_flight(self, mailbox: Mailbox) -> list[InFlightRow]:
        """Every unsettled mail of ``mailbox``, in the order they were handed on."""
        ...

    async def handed_on(
        self, account: str, pairs: Iterable[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Which (Message-ID, sender) pairs name mail of ``account`` already accepted
        (settled, in flight, or waiting): the duplicate check. Refused or quarantined
        mail never counts, and another sender's mail with the same id is not a copy."""
        ...

    async def find_message(
        self, account: str, message_id: str, *, recipient: str | None = None
    ) -> LedgerEntry | None:
        """The newest handed-on (settled or in flight) mail with this Message-ID (a
        reply's parent); with ``recipient``, one from (or replying to) that address
        wins over another sender's mail with the same id."""
        ...

    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None:
        """The newest handed-on mail from ``sender`` (or whose reply target it is)."""
        ...

    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None:
        """The newest handed-on mail of the conversation ``thread_ts``."""
        ...

    # deferred mail (per mailbox) and rate history (per account)

    async def waiting(self, mailbox: Mailbox) -> list[WaitingRow]:
        """Every deferred mail of ``mailbox``, in line (``seq``) order."""
        ...

    async def deferred_message(self, key: MailKey) -> str | None:
        """The waiting mail's ChannelMessage JSON, None when it is not waiting."""
        ...

    async def quarantined(self, account: str, limit: int = 100) -> list[QuarantinedMail]:
        """The newest quarantined mail of ``account`` first (mail handed on since, e.g.
        a copy that passed later, is no longer quarantined)."""
        ...

    async def request_release(
        self, key: MailKey, *, refuse: Sequence[str] = ()
    ) -> ReleaseRequest | None:
        """Ask, durably, for the quarantined mail ``key`` to be handed on once.

        None: no quarantined mail has that key (never quarantined, or refused). Else the
        request as it stands after this transaction: recorded now (``new``; a failed
        request is asked again the same way), or an earlier one unchanged (pending, or
        released). Mail that was handed on since (a copy that passed) answers as
        released. A mail whose quarantine reason is in ``refuse`` is not recorded: the
        answer is not ``new`` and its state is ``failed``.
        """
        ...

    async def release_request(self, key: MailKey) -> ReleaseRequest | None:
        """The release request of ``key`` as it stands (None: never asked for)."""
        ...

    async def pending_releases(self, account: str | None = None) -> list[ReleaseRequest]:
        """Every pending release request of ``account`` (of every account when None:
        one read however many mailboxes a process serves), oldest first."""
        ...

    async def fail_release(self, key: MailKey, code: str, detail: str) -> None:
        """The pending request of ``key`` failed (``code``, ``detail``): the mail stays
        quarantined; asking again records a new request."""
        ...

    async def refuse_waiting(self, key: MailKey, reason: str, *, fence: int | None = None) -> bool:
        """A waiting mail is refused after all (its sender is no longer allowed): its
        deferred row goes and its ledger row becomes ``rejected`` with ``reason``; it is
        never handed on. False when it was not waiting (nothing changes).
        ``fence``: as :attr:`HandoffBatch.fence` (a replica that lost the mailbox
        refuses nothing: the new holder decides)."""
        ...

    async def prune_refused(self, account: str, before: float) -> int:
        """Delete the ledger rows of ``account``'s refused mail recorded before ``before``
        (Unix time); returns how many.

        Only rows the mailbox's cursor has passed go (or rows of a UIDVALIDITY the
        mailbox no longer has): that mail is never fetched again whatever the ledger
        says. Quarantined, deferred and handed-on rows are never touched."""
        ...

    async def recent_handoffs(self, account: str, since: float) -> list[tuple[str, float]]:
        """``(sender, when)`` of every mail of ``account`` handed on after ``since``
        (settled or in flight, each mail once), oldest first."""
        ...

    # runtime allow-list (per account)

    async def runtime_senders(self, account: str) -> SenderChanges: ...

    async def change_sender(
        self, account: str, entry: str, *, allow: bool, in_config: bool
    ) -> None:
        """Record that ``entry`` is now allowed (or not), as a difference from the
        config (back to what the config says: no difference kept)."""
        ...

    # outbox and OAuth tokens (per account)

    def outbox(self, account: str) -> OutboxStore: ...

    def tokens(self, account: str, *, username: str | None = None) -> TokenStore:
        """The token record of ``account`` (usable without :meth:`open`: the CLI and the
        doctor use it alone). ``username``: the login the grant is for, by which a
        backend may adopt a record an older release kept elsewhere."""
        ...
