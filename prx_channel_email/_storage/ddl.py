"""Splitting a DDL script into statements, for every backend's migrations; and what both
backends share word for word: DDL of shared steps, placeholder-free query parts, and
the decisions made on rows they read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prx_channel_email._storage.interface import (
    QUARANTINED,
    REJECTED,
    RELEASE_DONE,
    RELEASE_FAILED,
    RELEASE_PENDING,
    MailKey,
    ReleaseRequest,
)


def statements(script: str) -> list[str]:
    """The ``;``-separated statements of ``script`` (comment lines dropped first, so a
    ``;`` in a comment cannot split a statement)."""
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [s for s in code.split(";") if s.strip()]


#: Step ``ledger_refused``: the refused ledger rows by age, for ``prune_refused``. Partial
#: (only refused rows are in it): it costs handed-on mail nothing.
LEDGER_REFUSED_INDEX = (
    "CREATE INDEX IF NOT EXISTS ledger_refused ON ledger (account, received_at)"
    " WHERE outcome='rejected'"
)


#: Step ``quarantine_releases``: the operator's requests to hand quarantined mail on
#: (written by the CLI or the host, carried out by the listener). ``reason`` is why the
#: mail was quarantined, ``code``/``detail`` why a release failed. (SQLite reads
#: BIGINT as INTEGER and DOUBLE PRECISION as REAL.)
RELEASE_REQUESTS = """
CREATE TABLE IF NOT EXISTS release_requests (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    code TEXT,
    detail TEXT,
    requested_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS release_requests_by_state
    ON release_requests (account, state, requested_at)
"""

#: A release request with its mail's Message-ID and sender: ``SELECT`` these ``FROM``
#: that, then :func:`release_row` makes each row a :class:`ReleaseRequest`.
RELEASE_COLUMNS = (
    "r.account, r.folder, r.uidvalidity, r.uid, r.state, r.reason,"
    " COALESCE(l.message_id, ''), COALESCE(l.sender, ''), r.requested_at, r.code, r.detail"
)
RELEASE_FROM = (
    " FROM release_requests r LEFT JOIN ledger l ON l.account=r.account AND"
    " l.folder=r.folder AND l.uidvalidity=r.uidvalidity AND l.uid=r.uid"
)


def release_row(r: Any) -> ReleaseRequest:
    """A row of ``RELEASE_COLUMNS`` as the interface's :class:`ReleaseRequest`."""
    key = MailKey(r[0], r[1], int(r[2]), int(r[3]))
    return ReleaseRequest(key, r[4], r[5], r[6], r[7], float(r[8]), r[9], r[10])


def release_answer(
    key: MailKey,
    ledger: tuple[str, str, str, str] | None,
    asked: ReleaseRequest | None,
    refuse: Sequence[str],
    now: float,
) -> tuple[ReleaseRequest | None, bool]:
    """What :meth:`Storage.request_release` answers, from the mail's ledger row
    ``(outcome, reason, message_id, sender)`` (None: no row) and the request already
    there; True when a pending request is to be written (the answer, ``new``)."""
    if ledger is None or ledger[0] == REJECTED:
        return None, False
    outcome, reason, message_id, sender = ledger
    if outcome != QUARANTINED:  # handed on (or waiting) since: nothing left to release
        return asked or ReleaseRequest(key, RELEASE_DONE, reason, message_id, sender, 0.0), False
    if asked is not None and asked.state != RELEASE_FAILED:
        return asked, False
    if reason in refuse:
        return ReleaseRequest(key, RELEASE_FAILED, reason, message_id, sender, now), False
    return ReleaseRequest(key, RELEASE_PENDING, reason, message_id, sender, now, new=True), True
