"""The SQL of received mail: the ledger, in-flight and deferred rows (their one owner).

Since the ``mail_keys`` migration every row about one received mail is keyed by
the mail itself (account, folder, uidvalidity, uid); the Message-ID is a column
like the sender. The steps that built the older shapes stay here as history
(never edited: a change is a new step). Every function takes a connection inside
a transaction of the store's thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prx_channel_email._storage.ddl import (
    RELEASE_COLUMNS,
    RELEASE_FROM,
    release_answer,
    release_row,
    statements,
)
from prx_channel_email._storage.interface import (
    ACCEPTED,
    DEFERRED,
    DELIVERED,
    QUARANTINED,
    REFUSED_ID_CHARS,
    REJECTED,
    RELEASE_DONE,
    RELEASE_FAILED,
    RELEASE_PENDING,
    CopiesOf,
    Deferral,
    HandoffBatch,
    InFlight,
    InFlightRow,
    LedgerEntry,
    Mailbox,
    MailKey,
    QuarantinedMail,
    Record,
    ReleaseRequest,
    WaitingRow,
    ledger_id,
)
from prx_channel_email.models import PackedMessage, packed_fields

_ACCEPTED_SQL = ",".join(f"'{o}'" for o in ACCEPTED)

# --- history: the shapes earlier releases wrote -------------------------------------

#: The ledger as the first release wrote it (part of the "base" step).
LEDGER_SCHEMA_V1 = """
-- Every inbound message the channel has decided on, by Message-ID.
-- outcome: 'delivered' (on the queue), 'rejected' (policy), 'quarantined' (unparseable).
CREATE TABLE IF NOT EXISTS ledger (
    account TEXT NOT NULL,
    message_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    folder TEXT,
    uidvalidity INTEGER,
    uid INTEGER,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (account, message_id)
);
CREATE INDEX IF NOT EXISTS ledger_by_sender ON ledger (account, sender, received_at);
CREATE INDEX IF NOT EXISTS ledger_by_thread ON ledger (account, thread_ts, received_at);
"""

_DEFERRED_V1 = """
CREATE TABLE IF NOT EXISTS deferred (
    account TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    reason TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (account, message_id)
);
CREATE INDEX IF NOT EXISTS deferred_in_order ON deferred (account, seq);
"""

INFLIGHT_V1 = """
-- Handed on (or about to be) and not settled yet: handed on again after a
-- restart. ``message`` is the ChannelMessage as JSON, the other columns are
-- the ledger row it becomes once settled (reply threading reads them too).
CREATE TABLE IF NOT EXISTS inflight (
    account TEXT NOT NULL,
    message_id TEXT NOT NULL,
    folder TEXT,
    uidvalidity INTEGER,
    uid INTEGER,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    message TEXT NOT NULL,
    handed_at REAL NOT NULL,
    PRIMARY KEY (account, message_id)
)
"""


def migrate_deferred_mail(conn: sqlite3.Connection) -> None:
    """Step ``deferred_mail``: the deferred table, and when each ledger row was handed on."""
    for statement in statements(_DEFERRED_V1):
        conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    if "handed_at" not in columns:
        conn.execute("ALTER TABLE ledger ADD COLUMN handed_at REAL")


# --- the current shape: keyed by the mail ---------------------------------------------

_MAIL_KEYS = """
CREATE TABLE ledger_new (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    handed_at REAL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE TABLE inflight_new (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    message TEXT NOT NULL,
    handed_at REAL NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE TABLE deferred_new (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    reason TEXT NOT NULL,
    arrived_at REAL NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
)
"""

_MAIL_KEY_INDEXES = """
CREATE INDEX ledger_by_id ON ledger (account, message_id);
CREATE INDEX ledger_by_sender ON ledger (account, sender, received_at);
CREATE INDEX ledger_by_thread ON ledger (account, thread_ts, received_at);
CREATE INDEX inflight_by_id ON inflight (account, message_id);
CREATE INDEX deferred_in_order ON deferred (account, folder, seq)
"""

#: Step ``inflight_message_last``: the in-flight table with ``message`` as its last
#: column. A big message is written as a zeroblob and then in pieces
#: (:func:`_insert_in_pieces`); SQLite allocates a zeroblob in full (twice) unless it
#: is the record's last value, which defeated the point for a 24 MB body.
INFLIGHT_MESSAGE_LAST = """
CREATE TABLE inflight_v3 (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at REAL NOT NULL,
    handed_at REAL NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
INSERT INTO inflight_v3 (account, folder, uidvalidity, uid, message_id, sender, reply_target,
    subject, thread_ts, refs, received_at, handed_at, message)
  SELECT account, folder, uidvalidity, uid, message_id, sender, reply_target,
    subject, thread_ts, refs, received_at, handed_at, message FROM inflight ORDER BY rowid;
DROP TABLE inflight;
ALTER TABLE inflight_v3 RENAME TO inflight;
CREATE INDEX inflight_by_id ON inflight (account, message_id)
"""

_LEDGER_COLS = (
    "account, folder, uidvalidity, uid, message_id, outcome, reason, sender,"
    " reply_target, subject, thread_ts, refs, received_at, handed_at"
)
_INFLIGHT_COLS = (
    "account, folder, uidvalidity, uid, message_id, sender, reply_target, subject,"
    " thread_ts, refs, received_at, handed_at, message"
)
_DEFERRED_COLS = (
    "account, folder, uidvalidity, uid, message_id, seq, sender, reason, arrived_at, message"
)


def migrate_mail_keys(conn: sqlite3.Connection) -> None:
    """Step ``mail_keys``: ledger, in-flight and deferred rows keyed by the mail
    (account, folder, uidvalidity, uid) instead of by (account, Message-ID).

    Rows of earlier releases keep everything they held. Their key is the one they
    recorded; an in-flight or deferred row that recorded none (mail released from
    the deferred table) takes its ledger row's; a row with no key anywhere (written
    by hand, or by a test) gets a key of its own that no real mail has: its folder
    (or ""), UIDVALIDITY 0 and a negative UID.
    """
    for statement in statements(_MAIL_KEYS):
        conn.execute(statement)
    taken: set[tuple[str, str, int, int]] = set()
    by_id: dict[tuple[str, str], tuple[str, str, int, int]] = {}
    spare = [0]

    def key(account: str, folder: Any, uv: Any, uid: Any) -> tuple[str, str, int, int]:
        if folder is not None and uv is not None and uid is not None:
            found = (account, str(folder), int(uv), int(uid))
            if found not in taken:
                return found
        spare[0] -= 1
        return (account, str(folder or ""), 0, spare[0])

    for row in conn.execute(
        "SELECT account, folder, uidvalidity, uid, message_id, outcome, reason, sender,"
        " reply_target, subject, thread_ts, refs, received_at, handed_at FROM ledger"
        " ORDER BY rowid"
    ).fetchall():
        k = key(row[0], row[1], row[2], row[3])
        taken.add(k)
        by_id[(row[0], row[4])] = k
        conn.execute(
            f"INSERT INTO ledger_new ({_LEDGER_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (*k, *row[4:]),
        )
    flying: set[tuple[str, str, int, int]] = set()
    for row in conn.execute(
        "SELECT account, folder, uidvalidity, uid, message_id, sender, reply_target, subject,"
        " thread_ts, refs, received_at, handed_at, message FROM inflight ORDER BY handed_at, rowid"
    ).fetchall():
        own = (row[1], row[2], row[3])
        if None in own and (row[0], row[4]) in by_id:
            k = by_id[(row[0], row[4])]
        elif None not in own and (row[0], row[1], row[2], row[3]) not in flying:
            k = (row[0], str(row[1]), int(row[2]), int(row[3]))
        else:
            k = key(row[0], None, None, None)
        flying.add(k)
        conn.execute(
            f"INSERT INTO inflight_new ({_INFLIGHT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (*k, *row[4:]),
        )
    for row in conn.execute(
        "SELECT account, message_id, seq, sender, reason, arrived_at, message FROM deferred"
        " ORDER BY seq"
    ).fetchall():
        k = by_id.get((row[0], row[1])) or key(row[0], None, None, None)
        conn.execute(
            f"INSERT OR REPLACE INTO deferred_new ({_DEFERRED_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (*k, *row[1:]),
        )
    for table in ("ledger", "inflight", "deferred"):
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
    for statement in statements(_MAIL_KEY_INDEXES):
        conn.execute(statement)


# --- writes ---------------------------------------------------------------------------

# One ledger row per mail: an accepted outcome replaces a refused one, never the
# other way round (the same mail decided again after a crash before the cursor moved).
_ACCEPTED_WINS = (
    " ON CONFLICT (account, folder, uidvalidity, uid) DO UPDATE SET"
    " message_id=excluded.message_id, outcome=excluded.outcome, reason=excluded.reason,"
    " sender=excluded.sender, reply_target=excluded.reply_target, subject=excluded.subject,"
    " thread_ts=excluded.thread_ts, refs=excluded.refs, received_at=excluded.received_at"
    f" WHERE excluded.outcome IN ({_ACCEPTED_SQL}) AND ledger.outcome NOT IN ({_ACCEPTED_SQL})"
)


def _k(key: MailKey) -> tuple[str, str, int, int]:
    return (key.account, key.folder, key.uidvalidity, key.uid)


def _entry_cols(entry: LedgerEntry | None) -> tuple[Any, ...]:
    if entry is None:
        return (None, None, None, None, None, time.time())
    return (
        entry.sender,
        entry.reply_target,
        entry.subject,
        entry.thread_ts,
        json.dumps(entry.references),
        entry.received_at,
    )


def _write_ledger(
    conn: sqlite3.Connection,
    rows: Iterable[tuple[MailKey, str, str, str | None, LedgerEntry | None]],
) -> None:
    conn.executemany(
        f"INSERT INTO ledger ({_LEDGER_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,NULL)"
        + _ACCEPTED_WINS,
        [
            (*_k(k), ledger_id(mid, outcome), outcome, reason, *_entry_cols(e))
            for k, mid, outcome, reason, e in rows
        ],
    )


_KEY_WHERE = "account=? AND folder=? AND uidvalidity=? AND uid=?"


def settle(conn: sqlite3.Connection, refs: Sequence[MailKey | CopiesOf]) -> list[MailKey]:
    """In-flight rows into the ledger as delivered; the keys that were in flight."""
    keys: list[MailKey] = []
    for ref in refs:
        if isinstance(ref, MailKey):
            found = conn.execute(f"SELECT 1 FROM inflight WHERE {_KEY_WHERE}", _k(ref)).fetchone()
            if found and ref not in keys:
                keys.append(ref)
            continue
        for row in conn.execute(
            "SELECT account, folder, uidvalidity, uid FROM inflight WHERE account=?"
            " AND message_id=? AND COALESCE(sender, '')=?",
            (ref.account, ref.message_id, ref.sender),
        ).fetchall():
            key = MailKey(row[0], row[1], row[2], row[3])
            if key not in keys:
                keys.append(key)
    for key in keys:
        conn.execute(
            f"INSERT INTO ledger ({_LEDGER_COLS}) SELECT account, folder, uidvalidity, uid,"
            f" message_id, '{DELIVERED}', NULL, sender, reply_target, subject, thread_ts, refs,"
            f" received_at, NULL FROM inflight WHERE {_KEY_WHERE}" + _ACCEPTED_WINS,
            _k(key),
        )
        conn.execute(f"DELETE FROM inflight WHERE {_KEY_WHERE}", _k(key))
    return keys


def commit_handoff(conn: sqlite3.Connection, batch: HandoffBatch) -> None:
    """Everything of :meth:`Storage.commit_handoff` but the cursor moves."""
    if batch.settle:
        settle(conn, batch.settle)
    records: list[Record] = list(batch.records)
    if records:
        _write_ledger(conn, ((r.key, r.message_id, r.outcome, r.reason, r.entry) for r in records))
    if batch.in_flight:
        now = time.time()
        small = [i for i in batch.in_flight if not _written_in_pieces(i.message)]
        conn.executemany(
            f"INSERT OR IGNORE INTO inflight ({_INFLIGHT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*_inflight_row(item, now), str(item.message)) for item in small],
        )
        for item in batch.in_flight:
            if isinstance(item.message, PackedMessage) and _written_in_pieces(item.message):
                row = _inflight_row(item, now)
                _insert_in_pieces(conn, "inflight", _INFLIGHT_COLS, row, item.message)
    if batch.deferrals:
        defer(conn, batch.deferrals)
    for release in batch.releases:
        conn.execute(
            f"UPDATE ledger SET outcome='{DELIVERED}', handed_at=? WHERE {_KEY_WHERE}",
            (release.handed_at, *_k(release.key)),
        )
        conn.execute(f"DELETE FROM deferred WHERE {_KEY_WHERE}", _k(release.key))
        conn.execute(
            f"UPDATE release_requests SET state='{RELEASE_DONE}', updated_at=?"
            f" WHERE {_KEY_WHERE} AND state='{RELEASE_PENDING}'",
            (release.handed_at, *_k(release.key)),
        )


def quarantined(conn: sqlite3.Connection, account: str, limit: int) -> list[QuarantinedMail]:
    """See :meth:`Storage.quarantined`."""
    rows = conn.execute(
        "SELECT folder, uidvalidity, uid, message_id, sender, subject, reason, received_at"
        f" FROM ledger WHERE account=? AND outcome='{QUARANTINED}'"
        " ORDER BY received_at DESC, uid DESC LIMIT ?",
        (account, limit),
    ).fetchall()
    return [
        QuarantinedMail(
            MailKey(account, r[0], int(r[1]), int(r[2])),
            r[3],
            r[4] or "",
            r[5] or "",
            r[6] or QUARANTINED,
            float(r[7]),
        )
        for r in rows
    ]


def release_request(conn: sqlite3.Connection, key: MailKey) -> ReleaseRequest | None:
    """See :meth:`Storage.release_request`."""
    where = "r.account=? AND r.folder=? AND r.uidvalidity=? AND r.uid=?"
    row = conn.execute(f"SELECT {RELEASE_COLUMNS}{RELEASE_FROM} WHERE {where}", _k(key)).fetchone()
    return release_row(row) if row else None


def pending_releases(conn: sqlite3.Connection, account: str | None) -> list[ReleaseRequest]:
    """See :meth:`Storage.pending_releases`."""
    mine, args = ("r.account=? AND ", (account,)) if account is not None else ("", ())
    rows = conn.execute(
        f"SELECT {RELEASE_COLUMNS}{RELEASE_FROM} WHERE {mine}"
        f"r.state='{RELEASE_PENDING}' ORDER BY r.requested_at, r.uid",
        args,
    )
    return [release_row(r) for r in rows]


def request_release(
    conn: sqlite3.Connection, key: MailKey, refuse: Sequence[str]
) -> ReleaseRequest | None:
    """See :meth:`Storage.request_release`."""
    row = conn.execute(
        f"SELECT outcome, COALESCE(reason, ''), message_id, COALESCE(sender, '') FROM ledger"
        f" WHERE {_KEY_WHERE}",
        _k(key),
    ).fetchone()
    answer, record = release_answer(key, row, release_request(conn, key), refuse, time.time())
    if record and answer is not None:
        conn.execute(
            "INSERT INTO release_requests (account, folder, uidvalidity, uid, state, reason,"
            " code, detail, requested_at, updated_at) VALUES (?,?,?,?,?,?, NULL, NULL, ?, ?)"
            " ON CONFLICT (account, folder, uidvalidity, uid) DO UPDATE SET"
            " state=excluded.state, reason=excluded.reason, code=NULL, detail=NULL,"
            " requested_at=excluded.requested_at, updated_at=excluded.updated_at",
            (*_k(key), answer.state, answer.reason, answer.requested_at, answer.requested_at),
        )
    return answer


def fail_release(conn: sqlite3.Connection, key: MailKey, code: str, detail: str) -> None:
    """See :meth:`Storage.fail_release`."""
    conn.execute(
        f"UPDATE release_requests SET state='{RELEASE_FAILED}', code=?, detail=?,"
        f" updated_at=? WHERE {_KEY_WHERE} AND state='{RELEASE_PENDING}'",
        (code, detail, time.time(), *_k(key)),
    )


def refuse_waiting(conn: sqlite3.Connection, key: MailKey, reason: str) -> bool:
    """See :meth:`Storage.refuse_waiting`."""
    if conn.execute(f"DELETE FROM deferred WHERE {_KEY_WHERE}", _k(key)).rowcount == 0:
        return False
    conn.execute(
        f"UPDATE ledger SET outcome='{REJECTED}', reason=?, message_id=substr(message_id, 1, ?)"
        f" WHERE {_KEY_WHERE} AND outcome='{DEFERRED}'",
        (reason, REFUSED_ID_CHARS, *_k(key)),
    )
    return True


def prune_refused(conn: sqlite3.Connection, account: str, before: float) -> int:
    """See :meth:`Storage.prune_refused`."""
    return int(
        conn.execute(
            f"DELETE FROM ledger WHERE account=? AND outcome='{REJECTED}' AND received_at<?"
            " AND EXISTS (SELECT 1 FROM cursor c WHERE c.account=ledger.account"
            " AND c.folder=ledger.folder"
            " AND (c.uidvalidity<>ledger.uidvalidity OR c.last_uid>=ledger.uid))",
            (account, before),
        ).rowcount
    )


def _inflight_row(item: InFlight, now: float) -> tuple[Any, ...]:
    """The columns of an in-flight row before ``message`` (its last)."""
    return (*_k(item.key), item.entry.message_id, *_entry_cols(item.entry), now)


#: A stored message longer than this is written with SQLite's blob I/O in pieces.
PIECES_OVER_CHARS = 1 << 20


def _written_in_pieces(message: str | PackedMessage) -> bool:
    return isinstance(message, PackedMessage) and len(message) > PIECES_OVER_CHARS


def _insert_in_pieces(
    conn: sqlite3.Connection,
    table: str,
    cols: str,
    head: tuple[Any, ...],
    message: PackedMessage,
) -> None:
    """Insert a row of ``table`` whose ``message`` (its last column) is written a
    piece at a time: a zeroblob of its size, then its UTF-8 bytes through the blob
    handle. Binding one 24 MB text made SQLite copy it twice (the bound value and
    the record) on top of the caller's strings, the peak of a big mail's whole
    path; this way SQLite holds a piece, and the row reads back as the same text
    (as bytes). The zeroblob must be the record's last value, or SQLite allocates
    it whole."""
    marks = ",".join("?" * len(head))
    cur = conn.execute(
        f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({marks},zeroblob(?))",
        (*head, message.encoded_size()),
    )
    if cur.rowcount != 1 or cur.lastrowid is None:
        return  # already there (INSERT OR IGNORE): the stored copy stands
    with conn.blobopen(table, "message", cur.lastrowid) as blob:
        for piece in message.encoded():
            blob.write(piece)


def defer(conn: sqlite3.Connection, items: Sequence[Deferral]) -> None:
    _write_ledger(conn, ((d.key, d.entry.message_id, DEFERRED, d.reason, d.entry) for d in items))
    small = [d for d in items if not _written_in_pieces(d.message)]
    conn.executemany(
        f"INSERT OR IGNORE INTO deferred ({_DEFERRED_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [(*_deferred_row(d), str(d.message)) for d in small],
    )
    for d in items:
        if isinstance(d.message, PackedMessage) and _written_in_pieces(d.message):
            _insert_in_pieces(conn, "deferred", _DEFERRED_COLS, _deferred_row(d), d.message)


def _deferred_row(d: Deferral) -> tuple[Any, ...]:
    """The columns of a deferred row before ``message`` (its last)."""
    return (*_k(d.key), d.entry.message_id, d.seq, d.entry.sender, d.reason, d.arrived_at)


# --- reads ----------------------------------------------------------------------------


def in_flight(conn: sqlite3.Connection, mailbox: Mailbox) -> list[InFlightRow]:
    rows = conn.execute(
        "SELECT account, folder, uidvalidity, uid, message_id, COALESCE(sender, ''), message"
        " FROM inflight WHERE account=? AND folder=? ORDER BY handed_at, rowid",
        (mailbox.account, mailbox.folder),
    )
    return [InFlightRow(MailKey(*r[:4]), r[4], r[5], _text(r[6])) for r in rows]


def _text(stored: str | bytes) -> str:
    """A stored message as text: one written in pieces reads back as a blob."""
    return stored if isinstance(stored, str) else bytes(stored).decode()


def handed_on(
    conn: sqlite3.Connection, account: str, pairs: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    ids = sorted({mid for mid, _ in pairs})
    found: set[tuple[str, str]] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT message_id, sender FROM ledger WHERE account=?"
            f" AND outcome IN ({_ACCEPTED_SQL}) AND message_id IN ({marks})"
            " UNION ALL SELECT message_id, sender FROM inflight WHERE account=?"
            f" AND message_id IN ({marks})",
            (account, *chunk, account, *chunk),
        )
        found.update(p for p in ((r[0], r[1] or "") for r in rows) if p in pairs)
    return found


def newest(
    conn: sqlite3.Connection, account: str, where: str, args: tuple[Any, ...]
) -> LedgerEntry | None:
    """The newest handed-on (settled or in flight) mail matching ``where``."""
    cols = (
        "message_id, sender, reply_target, subject, thread_ts, refs, received_at,"
        " account, folder, uidvalidity, uid"
    )
    order = " ORDER BY received_at DESC, rowid DESC LIMIT 1"
    settled = f"SELECT {cols} FROM ledger WHERE account=? AND outcome='{DELIVERED}' AND {where}"
    flying = f"SELECT {cols} FROM inflight WHERE account=? AND {where}"
    found = [conn.execute(sql + order, (account, *args)).fetchone() for sql in (flying, settled)]
    rows = [r for r in found if r is not None]
    if not rows:
        return None
    row = max(rows, key=lambda r: float(r[6]))  # the in-flight one wins a tie
    return LedgerEntry(
        message_id=row[0],
        sender=row[1] or "",
        reply_target=row[2] or row[1] or "",
        subject=row[3] or "",
        thread_ts=row[4] or row[0],
        references=json.loads(row[5]) if row[5] else [],
        received_at=row[6],
        key=MailKey(row[7], row[8], row[9], row[10]),
    )


def waiting(conn: sqlite3.Connection, mailbox: Mailbox) -> list[WaitingRow]:
    return [
        WaitingRow(
            MailKey(*r[:4]),
            r[4],
            r[5],
            r[6],
            r[7],
            r[8],
            str(packed_fields(r[9]).get("thread_ts") or ""),
        )
        for r in conn.execute(
            f"SELECT {_DEFERRED_COLS} FROM deferred WHERE account=? AND folder=? ORDER BY seq",
            (mailbox.account, mailbox.folder),
        )
    ]


def deferred_message(conn: sqlite3.Connection, key: MailKey) -> str | None:
    row = conn.execute(f"SELECT message FROM deferred WHERE {_KEY_WHERE}", _k(key)).fetchone()
    return _text(row[0]) if row else None


def recent_handoffs(
    conn: sqlite3.Connection, account: str, since: float
) -> list[tuple[str, float]]:
    """Settled ones from the ledger, unacknowledged ones from the in-flight table (each
    mail once: a released mail is in both, and the ledger's time counts)."""
    found: dict[tuple[str, int, int], tuple[str, float]] = {}
    for folder, uv, uid, sender, at in conn.execute(
        "SELECT folder, uidvalidity, uid, sender, COALESCE(handed_at, received_at) FROM ledger"
        f" WHERE account=? AND outcome='{DELIVERED}' AND sender IS NOT NULL"
        " AND COALESCE(handed_at, received_at) > ?"
        " UNION ALL SELECT folder, uidvalidity, uid, sender, handed_at FROM inflight"
        " WHERE account=? AND sender IS NOT NULL AND handed_at > ?",
        (account, since, account, since),
    ):
        found.setdefault((folder, uv, uid), (sender, at))
    return sorted(found.values(), key=lambda pair: pair[1])
