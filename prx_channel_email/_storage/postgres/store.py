"""The PostgreSQL backend of the storage interface: shared state for replicas.

The same promises as the SQLite backend (each method one transaction, all or
nothing; the same keys), plus what sharing needs:

- a write for a mailbox that carries a fencing token (``HandoffBatch.fence``,
  ``set_cursor(fence=)``) is checked against that mailbox's lease inside the same
  transaction (:func:`~prx_channel_email._storage.postgres.leases.fence_epoch`) and
  refused with ``LeaseLost`` when the lease moved on: nothing of it is written;
- outbox rows are claimed with ``FOR UPDATE SKIP LOCKED`` under a time lease, so two
  replicas never send one row at once, and a dead replica's rows are taken over;
- the OAuth refresh lock is a row lock held by one transaction, exclusive across
  every replica.

Row order that SQLite takes from ``rowid`` comes from an identity column ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any, TypeVar

from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._storage.ddl import (
    RELEASE_COLUMNS,
    RELEASE_FROM,
    release_answer,
    release_row,
)
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
    HandoffBatch,
    InFlightRow,
    LeaseLost,
    LedgerEntry,
    Mailbox,
    MailKey,
    NewRow,
    OutboxEntry,
    OutboxRow,
    QuarantinedMail,
    ReleaseRequest,
    SenderChanges,
    Stored,
    TokenRecord,
    WaitingRow,
    ledger_id,
)
from prx_channel_email._storage.postgres.leases import fence_epoch
from prx_channel_email._storage.postgres.schema import mask_url, migrate, storage_error
from prx_channel_email.errors import ChannelError, OAuthUnavailable, StorageError
from prx_channel_email.models import packed_fields

T = TypeVar("T")
Cur = Any  # psycopg.AsyncCursor

_LEDGER_COLS = (
    "account, folder, uidvalidity, uid, message_id, outcome, reason, sender,"
    " reply_target, subject, thread_ts, refs, received_at, handed_at"
)
_ACCEPTED_WINS = (
    " ON CONFLICT (account, folder, uidvalidity, uid) DO UPDATE SET"
    " message_id=excluded.message_id, outcome=excluded.outcome, reason=excluded.reason,"
    " sender=excluded.sender, reply_target=excluded.reply_target, subject=excluded.subject,"
    " thread_ts=excluded.thread_ts, refs=excluded.refs, received_at=excluded.received_at"
    " WHERE excluded.outcome = ANY(%(accepted)s) AND NOT ledger.outcome = ANY(%(accepted)s)"
)
_KEY = "account=%s AND folder=%s AND uidvalidity=%s AND uid=%s"
_ENTRY_COLUMNS = (
    "id, message_id, state, recipient, attempts, last_error, smtp_code,"
    " created_at, updated_at, error_code"
)
#: Each operation's whole budget (connect, queue for a connection, run): a database
#: that stops answering fails the operation instead of hanging the channel.
OP_TIMEOUT = 30.0


def _k(key: MailKey) -> tuple[str, str, int, int]:
    return (key.account, key.folder, key.uidvalidity, key.uid)


def _entry(entry: LedgerEntry | None) -> dict[str, Any]:
    if entry is None:
        return {"sender": None, "reply_target": None, "subject": None, "thread_ts": None,
                "refs": None, "received_at": time.time()}  # fmt: skip
    return {
        "sender": entry.sender,
        "reply_target": entry.reply_target,
        "subject": entry.subject,
        "thread_ts": entry.thread_ts,
        "refs": json.dumps(entry.references),
        "received_at": entry.received_at,
    }


class PostgresStore:
    """:class:`~prx_channel_email._storage.interface.Storage` on one PostgreSQL database."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = url
        self.location = mask_url(url)
        self.pool_size = pool_size
        self._pool: Any = None
        self._outboxes: dict[str, PgOutbox] = {}

    # --- life ---

    async def open(self) -> PostgresStore:
        if self._pool is None:
            from psycopg_pool import AsyncConnectionPool

            pool = AsyncConnectionPool(
                self.url, min_size=1, max_size=self.pool_size, open=False, timeout=OP_TIMEOUT,
                kwargs={"prepare_threshold": None, "connect_timeout": 10},
            )  # fmt: skip
            try:
                # One plain connection first: a wrong URL or password fails at once
                # with the server's reason, instead of the pool retrying until timeout.
                import psycopg

                probe = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(
                        self.url, connect_timeout=10, prepare_threshold=None
                    ),
                    OP_TIMEOUT,
                )
                await probe.close()
                await pool.open(wait=True, timeout=OP_TIMEOUT)
                await asyncio.wait_for(migrate(pool), OP_TIMEOUT * 2)
            except BaseException as exc:
                await pool.close()
                if isinstance(exc, Exception):
                    raise storage_error(exc, self.url) from None
                raise
            self._pool = pool
        return self

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> PostgresStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("state store is not open")
        return self._pool

    async def run(self, fn: Callable[[Cur], Awaitable[T]]) -> T:
        """``fn(cursor)`` as one transaction; a database failure is a StorageError."""

        async def tx() -> T:
            async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                return await fn(cur)

        try:
            return await asyncio.wait_for(tx(), OP_TIMEOUT)
        except (StorageError, ChannelError):
            raise
        except Exception as exc:
            raise storage_error(exc, self.url) from None

    async def migrations(self) -> list[str]:
        async def q(cur: Cur) -> list[str]:
            await cur.execute("SELECT name FROM schema_migrations ORDER BY seq")
            return [r[0] for r in await cur.fetchall()]

        return await self.run(q)

    async def database_now(self) -> float:
        """The database's clock (Unix seconds): the doctor compares it with ours."""

        async def q(cur: Cur) -> float:
            await cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            row = await cur.fetchone()
            return float(row[0])

        return await self.run(q)

    # --- cursor ---

    async def get_cursor(self, mailbox: Mailbox) -> Cursor | None:
        async def q(cur: Cur) -> Cursor | None:
            await cur.execute(
                "SELECT uidvalidity, last_uid, updated_at FROM cursor WHERE account=%s"
                " AND folder=%s",
                (mailbox.account, mailbox.folder),
            )
            row = await cur.fetchone()
            return Cursor(int(row[0]), int(row[1]), float(row[2])) if row else None

        return await self.run(q)

    async def set_cursor(
        self, mailbox: Mailbox, cursor: Cursor, *, fence: int | None = None
    ) -> None:
        async def tx(cur: Cur) -> None:
            if fence is not None:
                await fence_epoch(cur, mailbox.account, mailbox.folder, fence)
            await _write_cursor(cur, mailbox, cursor)

        await self.run(tx)

    # --- the hand-off ---

    async def commit_handoff(self, batch: HandoffBatch) -> None:
        async def tx(cur: Cur) -> None:
            if batch.fence is not None:
                await fence_epoch(cur, batch.mailbox.account, batch.mailbox.folder, batch.fence)
            if batch.settle:
                await _settle(cur, batch.settle)
            for r in batch.records:
                await _write_ledger(cur, r.key, r.message_id, r.outcome, r.reason, r.entry)
            now = time.time()
            for item in batch.in_flight:
                await cur.execute(
                    "INSERT INTO inflight (account, folder, uidvalidity, uid, message_id, sender,"
                    " reply_target, subject, thread_ts, refs, received_at, message, handed_at)"
                    " VALUES (%(a)s, %(f)s, %(v)s, %(u)s, %(mid)s, %(sender)s, %(reply_target)s,"
                    " %(subject)s, %(thread_ts)s, %(refs)s, %(received_at)s, %(msg)s, %(now)s)"
                    " ON CONFLICT DO NOTHING",
                    {
                        **_named(item.key),
                        "mid": item.entry.message_id,
                        **_entry(item.entry),
                        "msg": str(item.message),
                        "now": now,
                    },
                )
            for d in batch.deferrals:
                await _write_ledger(cur, d.key, d.entry.message_id, DEFERRED, d.reason, d.entry)
                await cur.execute(
                    "INSERT INTO deferred (account, folder, uidvalidity, uid, message_id, seq,"
                    " sender, reason, arrived_at, message) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                    " ON CONFLICT DO NOTHING",
                    (
                        *_k(d.key),
                        d.entry.message_id,
                        d.seq,
                        d.entry.sender,
                        d.reason,
                        d.arrived_at,
                        str(d.message),
                    ),
                )
            for release in batch.releases:
                await cur.execute(
                    f"UPDATE ledger SET outcome='{DELIVERED}', handed_at=%s WHERE {_KEY}",
                    (release.handed_at, *_k(release.key)),
                )
                await cur.execute(f"DELETE FROM deferred WHERE {_KEY}", _k(release.key))
                await cur.execute(
                    f"UPDATE release_requests SET state='{RELEASE_DONE}', updated_at=%s"
                    f" WHERE {_KEY} AND state='{RELEASE_PENDING}'",
                    (release.handed_at, *_k(release.key)),
                )
            for cursor in batch.cursors:
                await _write_cursor(cur, batch.mailbox, cursor)

        await self.run(tx)

    async def settle(self, refs: Sequence[MailKey | CopiesOf]) -> list[MailKey]:
        if not refs:
            return []
        return await self.run(lambda cur: _settle(cur, refs))

    async def in_flight(self, mailbox: Mailbox) -> list[InFlightRow]:
        async def q(cur: Cur) -> list[InFlightRow]:
            await cur.execute(
                "SELECT account, folder, uidvalidity, uid, message_id, COALESCE(sender, ''),"
                " message FROM inflight WHERE account=%s AND folder=%s ORDER BY handed_at, seq",
                (mailbox.account, mailbox.folder),
            )
            return [
                InFlightRow(MailKey(r[0], r[1], int(r[2]), int(r[3])), r[4], r[5], r[6])
                for r in await cur.fetchall()
            ]

        return await self.run(q)

    async def handed_on(
        self, account: str, pairs: Iterable[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        wanted = set(pairs)
        if not wanted:
            return set()
        ids = sorted({mid for mid, _ in wanted})

        async def q(cur: Cur) -> set[tuple[str, str]]:
            await cur.execute(
                "SELECT message_id, sender FROM ledger WHERE account=%s AND outcome = ANY(%s)"
                " AND message_id = ANY(%s) UNION ALL SELECT message_id, sender FROM inflight"
                " WHERE account=%s AND message_id = ANY(%s)",
                (account, list(ACCEPTED), ids, account, ids),
            )
            found = ((r[0], r[1] or "") for r in await cur.fetchall())
            return {p for p in found if p in wanted}

        return await self.run(q)

    async def find_message(
        self, account: str, message_id: str, *, recipient: str | None = None
    ) -> LedgerEntry | None:
        async def q(cur: Cur) -> LedgerEntry | None:
            if recipient:
                addr = fold_address(recipient)
                found = await _newest(cur, account, "message_id=%s AND (sender=%s OR"
                                      " reply_target=%s)", (message_id, addr, addr))  # fmt: skip
                if found is not None:
                    return found
            return await _newest(cur, account, "message_id=%s", (message_id,))

        return await self.run(q)

    async def latest_from(self, account: str, sender: str) -> LedgerEntry | None:
        addr = fold_address(sender)
        return await self.run(
            lambda cur: _newest(cur, account, "(sender=%s OR reply_target=%s)", (addr, addr))
        )

    async def latest_in_thread(self, account: str, thread_ts: str) -> LedgerEntry | None:
        return await self.run(
            lambda cur: _newest(
                cur, account, "(thread_ts=%s OR message_id=%s)", (thread_ts, thread_ts)
            )
        )

    # --- deferred mail and rate history ---

    async def waiting(self, mailbox: Mailbox) -> list[WaitingRow]:
        async def q(cur: Cur) -> list[WaitingRow]:
            await cur.execute(
                "SELECT account, folder, uidvalidity, uid, message_id, seq, sender, reason,"
                " arrived_at, message FROM deferred WHERE account=%s AND folder=%s ORDER BY seq",
                (mailbox.account, mailbox.folder),
            )
            return [
                WaitingRow(MailKey(r[0], r[1], int(r[2]), int(r[3])), r[4], int(r[5]), r[6],
                           r[7], float(r[8]), str(packed_fields(r[9]).get("thread_ts") or ""))
                for r in await cur.fetchall()
            ]  # fmt: skip

        return await self.run(q)

    async def deferred_message(self, key: MailKey) -> str | None:
        async def q(cur: Cur) -> str | None:
            await cur.execute(f"SELECT message FROM deferred WHERE {_KEY}", _k(key))
            row = await cur.fetchone()
            return str(row[0]) if row else None

        return await self.run(q)

    async def quarantined(self, account: str, limit: int = 100) -> list[QuarantinedMail]:
        async def q(cur: Cur) -> list[QuarantinedMail]:
            await cur.execute(
                "SELECT folder, uidvalidity, uid, message_id, sender, subject, reason,"
                f" received_at FROM ledger WHERE account=%s AND outcome='{QUARANTINED}'"
                " ORDER BY received_at DESC, uid DESC LIMIT %s",
                (account, limit),
            )
            return [
                QuarantinedMail(
                    MailKey(account, r[0], int(r[1]), int(r[2])),
                    r[3],
                    r[4] or "",
                    r[5] or "",
                    r[6] or QUARANTINED,
                    float(r[7]),
                )
                for r in await cur.fetchall()
            ]

        return await self.run(q)

    async def refuse_waiting(self, key: MailKey, reason: str, *, fence: int | None = None) -> bool:
        async def tx(cur: Cur) -> bool:
            if fence is not None:
                await fence_epoch(cur, key.account, key.folder, fence)
            await cur.execute(f"DELETE FROM deferred WHERE {_KEY}", _k(key))
            if cur.rowcount == 0:
                return False
            await cur.execute(
                f"UPDATE ledger SET outcome='{REJECTED}', reason=%s,"
                f" message_id=substr(message_id, 1, %s) WHERE {_KEY} AND outcome='{DEFERRED}'",
                (reason, REFUSED_ID_CHARS, *_k(key)),
            )
            return True

        return await self.run(tx)

    # --- releases of quarantined mail ---

    async def request_release(
        self, key: MailKey, *, refuse: Sequence[str] = ()
    ) -> ReleaseRequest | None:
        async def tx(cur: Cur) -> ReleaseRequest | None:
            # The ledger row is locked: a hand-off of this mail commits before or after.
            await cur.execute(
                "SELECT outcome, COALESCE(reason, ''), message_id, COALESCE(sender, '')"
                f" FROM ledger WHERE {_KEY} FOR UPDATE",
                _k(key),
            )
            row = await cur.fetchone()
            asked = await _release_request(cur, key)
            answer, record = release_answer(key, row, asked, refuse, time.time())
            if record and answer is not None:
                await cur.execute(
                    "INSERT INTO release_requests (account, folder, uidvalidity, uid, state,"
                    " reason, code, detail, requested_at, updated_at) VALUES (%s,%s,%s,%s,%s,"
                    " %s, NULL, NULL, %s, %s) ON CONFLICT (account, folder, uidvalidity, uid)"
                    " DO UPDATE SET state=excluded.state, reason=excluded.reason, code=NULL,"
                    " detail=NULL, requested_at=excluded.requested_at,"
                    " updated_at=excluded.updated_at",
                    (*_k(key), answer.state, answer.reason, answer.requested_at,
                     answer.requested_at),
                )  # fmt: skip
            return answer

        return await self.run(tx)

    async def release_request(self, key: MailKey) -> ReleaseRequest | None:
        return await self.run(lambda cur: _release_request(cur, key))

    async def pending_releases(self, account: str | None = None) -> list[ReleaseRequest]:
        mine, args = ("r.account=%s AND ", (account,)) if account is not None else ("", ())

        async def q(cur: Cur) -> list[ReleaseRequest]:
            await cur.execute(
                f"SELECT {RELEASE_COLUMNS}{RELEASE_FROM} WHERE {mine}"
                f"r.state='{RELEASE_PENDING}' ORDER BY r.requested_at, r.uid",
                args,
            )
            return [release_row(r) for r in await cur.fetchall()]

        return await self.run(q)

    async def fail_release(self, key: MailKey, code: str, detail: str) -> None:
        async def tx(cur: Cur) -> None:
            await cur.execute(
                f"UPDATE release_requests SET state='{RELEASE_FAILED}', code=%s, detail=%s,"
                f" updated_at=%s WHERE {_KEY} AND state='{RELEASE_PENDING}'",
                (code, detail, time.time(), *_k(key)),
            )

        await self.run(tx)

    async def prune_refused(self, account: str, before: float) -> int:
        """Any replica may run it: the rows it deletes are no lease's business (the
        cursor the check reads only moves forward)."""

        async def tx(cur: Cur) -> int:
            await cur.execute(
                f"DELETE FROM ledger l WHERE l.account=%s AND l.outcome='{REJECTED}'"
                " AND l.received_at<%s AND EXISTS (SELECT 1 FROM cursor c"
                " WHERE c.account=l.account AND c.folder=l.folder"
                " AND (c.uidvalidity<>l.uidvalidity OR c.last_uid>=l.uid))",
                (account, before),
            )
            return int(cur.rowcount)

        return await self.run(tx)

    async def recent_handoffs(self, account: str, since: float) -> list[tuple[str, float]]:
        async def q(cur: Cur) -> list[tuple[str, float]]:
            await cur.execute(
                "SELECT folder, uidvalidity, uid, sender, COALESCE(handed_at, received_at)"
                f" FROM ledger WHERE account=%s AND outcome='{DELIVERED}' AND sender IS NOT NULL"
                " AND COALESCE(handed_at, received_at) > %s"
                " UNION ALL SELECT folder, uidvalidity, uid, sender, handed_at FROM inflight"
                " WHERE account=%s AND sender IS NOT NULL AND handed_at > %s",
                (account, since, account, since),
            )
            found: dict[tuple[str, int, int], tuple[str, float]] = {}
            for folder, uv, uid, sender, at in await cur.fetchall():
                found.setdefault((folder, int(uv), int(uid)), (sender, float(at)))
            return sorted(found.values(), key=lambda pair: pair[1])

        return await self.run(q)

    # --- runtime allow-list ---

    async def runtime_senders(self, account: str) -> SenderChanges:
        async def q(cur: Cur) -> SenderChanges:
            await cur.execute(
                "SELECT entry, allowed FROM runtime_senders WHERE account=%s"
                " ORDER BY changed_at, entry",
                (account,),
            )
            rows = await cur.fetchall()
            return SenderChanges([e for e, a in rows if a], [e for e, a in rows if not a])

        return await self.run(q)

    async def change_sender(
        self, account: str, entry: str, *, allow: bool, in_config: bool
    ) -> None:
        async def tx(cur: Cur) -> None:
            if allow == in_config:
                await cur.execute(
                    "DELETE FROM runtime_senders WHERE account=%s AND entry=%s", (account, entry)
                )
                return
            await cur.execute(
                "INSERT INTO runtime_senders (account, entry, allowed, changed_at)"
                " VALUES (%s,%s,%s,%s) ON CONFLICT (account, entry) DO UPDATE SET"
                " allowed=excluded.allowed, changed_at=excluded.changed_at",
                (account, entry, allow, time.time()),
            )

        await self.run(tx)

    # --- per account ---

    def outbox(self, account: str) -> PgOutbox:
        table = self._outboxes.get(account)
        if table is None:
            table = self._outboxes[account] = PgOutbox(self, account)
        return table

    def tokens(self, account: str, *, username: str | None = None) -> PgTokenStore:
        return PgTokenStore(self, account)


async def _release_request(cur: Cur, key: MailKey) -> ReleaseRequest | None:
    where = "r.account=%s AND r.folder=%s AND r.uidvalidity=%s AND r.uid=%s"
    await cur.execute(f"SELECT {RELEASE_COLUMNS}{RELEASE_FROM} WHERE {where}", _k(key))
    row = await cur.fetchone()
    return release_row(row) if row else None


def _named(key: MailKey) -> dict[str, Any]:
    return {"a": key.account, "f": key.folder, "v": key.uidvalidity, "u": key.uid}


async def _write_cursor(cur: Cur, mailbox: Mailbox, cursor: Cursor) -> None:
    await cur.execute(
        "INSERT INTO cursor (account, folder, uidvalidity, last_uid, updated_at)"
        " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (account, folder) DO UPDATE SET"
        " uidvalidity=excluded.uidvalidity,"
        " last_uid=CASE WHEN cursor.uidvalidity=excluded.uidvalidity"
        "  THEN greatest(cursor.last_uid, excluded.last_uid) ELSE excluded.last_uid END,"
        " updated_at=excluded.updated_at",
        (mailbox.account, mailbox.folder, cursor.uidvalidity, cursor.last_uid, time.time()),
    )


async def _write_ledger(
    cur: Cur, key: MailKey, message_id: str, outcome: str, reason: str | None,
    entry: LedgerEntry | None,
) -> None:  # fmt: skip
    await cur.execute(
        f"INSERT INTO ledger ({_LEDGER_COLS}) VALUES (%(a)s, %(f)s, %(v)s, %(u)s, %(mid)s,"
        " %(outcome)s, %(reason)s, %(sender)s, %(reply_target)s, %(subject)s, %(thread_ts)s,"
        " %(refs)s, %(received_at)s, NULL)" + _ACCEPTED_WINS,
        {
            **_named(key),
            "mid": ledger_id(message_id, outcome),
            "outcome": outcome,
            "reason": reason,
            **_entry(entry),
            "accepted": list(ACCEPTED),
        },
    )


async def _settle(cur: Cur, refs: Sequence[MailKey | CopiesOf]) -> list[MailKey]:
    keys: list[MailKey] = []
    for ref in refs:
        if isinstance(ref, MailKey):
            await cur.execute(f"SELECT 1 FROM inflight WHERE {_KEY}", _k(ref))
            if await cur.fetchone() and ref not in keys:
                keys.append(ref)
            continue
        await cur.execute(
            "SELECT account, folder, uidvalidity, uid FROM inflight WHERE account=%s"
            " AND message_id=%s AND COALESCE(sender, '')=%s",
            (ref.account, ref.message_id, ref.sender),
        )
        for r in await cur.fetchall():
            key = MailKey(r[0], r[1], int(r[2]), int(r[3]))
            if key not in keys:
                keys.append(key)
    for key in keys:
        await cur.execute(
            f"INSERT INTO ledger ({_LEDGER_COLS}) SELECT account, folder, uidvalidity, uid,"
            f" message_id, '{DELIVERED}', NULL, sender, reply_target, subject, thread_ts, refs,"
            " received_at, NULL FROM inflight WHERE account=%(a)s AND folder=%(f)s"
            " AND uidvalidity=%(v)s AND uid=%(u)s" + _ACCEPTED_WINS,
            {**_named(key), "accepted": list(ACCEPTED)},
        )
        await cur.execute(f"DELETE FROM inflight WHERE {_KEY}", _k(key))
    return keys


async def _newest(cur: Cur, account: str, where: str, args: tuple[Any, ...]) -> LedgerEntry | None:
    cols = (
        "message_id, sender, reply_target, subject, thread_ts, refs, received_at,"
        " account, folder, uidvalidity, uid"
    )
    order = " ORDER BY received_at DESC, seq DESC LIMIT 1"
    rows = []
    for sql in (
        f"SELECT {cols} FROM inflight WHERE account=%s AND {where}",
        f"SELECT {cols} FROM ledger WHERE account=%s AND outcome='{DELIVERED}' AND {where}",
    ):
        await cur.execute(sql + order, (account, *args))
        row = await cur.fetchone()
        if row is not None:
            rows.append(row)
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
        received_at=float(row[6]),
        key=MailKey(row[7], row[8], int(row[9]), int(row[10])),
    )


def _outbox_row(v: Any) -> OutboxRow:
    return OutboxRow(int(v[0]), v[1], v[2], v[3], bytes(v[4]), int(v[5]))


def _outbox_entry(v: Any) -> OutboxEntry:
    return OutboxEntry(int(v[0]), v[1], v[2], v[3], int(v[4]), v[5], v[6], float(v[7]),
                       float(v[8]), v[9])  # fmt: skip


class PgOutbox:
    """The outbox rows of one account (an OutboxStore), shared by every replica.

    A row is sent by whoever holds its time lease (``lease_until``); claims skip rows
    another transaction is claiming (``SKIP LOCKED``), and a row whose lease ran out
    (its replica died or froze) is due again for any replica of the account.
    """

    def __init__(self, store: PostgresStore, account: str) -> None:
        self.store = store
        self.account = account

    @staticmethod
    async def _mark_sent(cur: Cur, rows: Sequence[OutboxRow]) -> None:
        now = time.time()
        for r in rows:
            await cur.execute(
                "UPDATE outbox SET state='sent', attempts=attempts+1, lease_until=NULL,"
                " last_error=NULL, smtp_code=250, updated_at=%s WHERE id=%s AND state!='sent'",
                (now, r.id),
            )

    async def mark_sent(self, rows: Sequence[OutboxRow]) -> None:
        await self.store.run(lambda cur: self._mark_sent(cur, rows))

    async def _pending(self, cur: Cur) -> int:
        await cur.execute(
            "SELECT count(*) FROM outbox WHERE account=%s AND state IN ('pending','sending')",
            (self.account,),
        )
        row = await cur.fetchone()
        return int(row[0])

    async def recover(self) -> tuple[int, int]:
        """At start: expired leases back to pending (rows of a dead replica too)."""
        now = time.time()

        async def tx(cur: Cur) -> tuple[int, int]:
            await cur.execute(
                "UPDATE outbox SET state='pending', lease_until=NULL, updated_at=%s"
                " WHERE account=%s AND state='sending' AND lease_until<=%s",
                (now, self.account, now),
            )
            expired = cur.rowcount
            await cur.execute(
                "UPDATE outbox SET next_attempt_at=%s WHERE account=%s AND state='pending'"
                " AND next_attempt_at>%s",
                (now, self.account, now),
            )
            return int(expired), await self._pending(cur)

        return await self.store.run(tx)

    async def insert(
        self, rows: Sequence[NewRow], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[list[Stored], float]:
        async def tx(cur: Cur) -> tuple[list[Stored], float]:
            await self._mark_sent(cur, sent)
            now = time.time()
            until = now + lease_secs
            stored: list[Stored] = []
            for r in rows:
                if r.idempotency_key:
                    # Serialize sends with one key across replicas (released at COMMIT).
                    await cur.execute(
                        "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
                        (self.account, r.idempotency_key),
                    )
                    held = await self._by_key(cur, r.idempotency_key)
                    if held is not None:
                        stored.append(Stored(held.id, held.message_id, held))
                        continue
                await cur.execute(
                    "INSERT INTO outbox (account, message_id, mail_from, recipient, raw, state,"
                    " attempts, next_attempt_at, lease_until, created_at, updated_at,"
                    " idempotency_key) VALUES (%s,%s,%s,%s,%s,'sending',0,%s,%s,%s,%s,%s)"
                    " RETURNING id",
                    (
                        self.account,
                        r.message_id,
                        r.mail_from,
                        r.recipient,
                        r.raw,
                        now,
                        until,
                        now,
                        now,
                        r.idempotency_key,
                    ),
                )
                row = await cur.fetchone()
                stored.append(Stored(int(row[0]), r.message_id))
            return stored, until

        return await self.store.run(tx)

    async def _by_key(self, cur: Cur, key: str) -> OutboxEntry | None:
        await cur.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE account=%s AND idempotency_key=%s",
            (self.account, key),
        )
        row = await cur.fetchone()
        return _outbox_entry(row) if row else None

    async def by_key(self, key: str) -> OutboxEntry | None:
        return await self.store.run(lambda cur: self._by_key(cur, key))

    async def sent_reply(self, message_id: str) -> tuple[float, str] | None:
        async def q(cur: Cur) -> tuple[float, str] | None:
            await cur.execute(
                "SELECT created_at, recipient FROM outbox WHERE account=%s AND message_id=%s"
                " ORDER BY created_at LIMIT 1",
                (self.account, message_id),
            )
            row = await cur.fetchone()
            return (float(row[0]), str(row[1])) if row else None

        return await self.store.run(q)

    async def claim_due(
        self, exclude: Iterable[int], lease_secs: float, *, sent: Sequence[OutboxRow]
    ) -> tuple[OutboxRow, float] | None:
        excluded = list(exclude)

        async def tx(cur: Cur) -> tuple[OutboxRow, float] | None:
            await self._mark_sent(cur, sent)
            now = time.time()
            await cur.execute(
                "SELECT id, message_id, mail_from, recipient, raw, attempts FROM outbox"
                " WHERE account=%s AND ((state='pending' AND next_attempt_at<=%s)"
                " OR (state='sending' AND lease_until<=%s)) AND NOT id = ANY(%s)"
                " ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (self.account, now, now, excluded),
            )
            values = await cur.fetchone()
            if values is None:
                return None
            until = now + lease_secs
            await cur.execute(
                "UPDATE outbox SET state='sending', lease_until=%s, updated_at=%s WHERE id=%s",
                (until, now, values[0]),
            )
            return _outbox_row(values), until

        return await self.store.run(tx)

    async def renew_lease(self, row_id: int, until: float, *, sent: Sequence[OutboxRow]) -> None:
        async def tx(cur: Cur) -> None:
            await self._mark_sent(cur, sent)
            await cur.execute(
                "UPDATE outbox SET lease_until=%s, updated_at=%s WHERE id=%s AND state='sending'",
                (until, time.time(), row_id),
            )

        await self.store.run(tx)

    async def release(self, ids: Sequence[int]) -> None:
        now = time.time()

        async def tx(cur: Cur) -> None:
            await cur.execute(
                "UPDATE outbox SET state='pending', lease_until=NULL, next_attempt_at=%s,"
                " updated_at=%s WHERE id = ANY(%s) AND state='sending'",
                (now, now, list(ids)),
            )

        await self.store.run(tx)

    async def fail(
        self,
        row_id: int,
        error: str,
        *,
        code: str,
        attempts: int | None = None,
        smtp_code: int | None,
    ) -> None:
        async def tx(cur: Cur) -> None:
            await cur.execute(
                "UPDATE outbox SET state='failed', attempts=COALESCE(%s, attempts),"
                " lease_until=NULL, last_error=%s, smtp_code=%s, error_code=%s, updated_at=%s"
                " WHERE id=%s",
                (attempts, error, smtp_code, code, time.time(), row_id),
            )

        await self.store.run(tx)

    async def retry_later(
        self, row_id: int, attempts: int, delay: float, error: str, smtp_code: int | None
    ) -> None:
        now = time.time()

        async def tx(cur: Cur) -> None:
            await cur.execute(
                "UPDATE outbox SET state='pending', attempts=%s, lease_until=NULL,"
                " next_attempt_at=%s, last_error=%s, smtp_code=%s, updated_at=%s WHERE id=%s",
                (attempts, now + delay, error, smtp_code, now, row_id),
            )

        await self.store.run(tx)

    async def next_due_in(self, exclude: Iterable[int], default: float) -> float:
        excluded = list(exclude)

        async def q(cur: Cur) -> float:
            await cur.execute(
                "SELECT min(CASE state WHEN 'pending' THEN next_attempt_at ELSE lease_until END)"
                " FROM outbox WHERE account=%s AND state IN ('pending','sending')"
                " AND NOT id = ANY(%s)",
                (self.account, excluded),
            )
            row = await cur.fetchone()
            if row is None or row[0] is None:
                return default
            return max(0.0, float(row[0]) - time.time())

        return await self.store.run(q)

    async def pending(self) -> int:
        return await self.store.run(self._pending)

    async def requeue_exhausted(self) -> int:
        now = time.time()

        async def tx(cur: Cur) -> int:
            await cur.execute(
                "UPDATE outbox SET state='pending', attempts=0, lease_until=NULL,"
                " next_attempt_at=%s, updated_at=%s WHERE account=%s AND state='failed'"
                " AND (starts_with(COALESCE(last_error, ''), %s)"
                " OR smtp_code BETWEEN 400 AND 499)",
                (now, now, self.account, EXHAUSTED_PREFIX),
            )
            return int(cur.rowcount)

        return await self.store.run(tx)

    async def requeue_ids(self, ids: Sequence[int]) -> int:
        now = time.time()

        async def tx(cur: Cur) -> int:
            await cur.execute(
                "UPDATE outbox SET state='pending', attempts=0, lease_until=NULL,"
                " next_attempt_at=%s, updated_at=%s WHERE account=%s AND id = ANY(%s)"
                " AND state='failed'",
                (now, now, self.account, list(ids)),
            )
            return int(cur.rowcount)

        return await self.store.run(tx)

    async def prune_sent(self, before: float) -> int:
        """Empty the text of rows sent before ``before``. PostgreSQL keeps the old row
        version until VACUUM reclaims it (autovacuum does, on its schedule)."""

        async def tx(cur: Cur) -> int:
            await cur.execute(
                "UPDATE outbox SET raw='' WHERE account=%s AND state='sent'"
                " AND updated_at<%s AND length(raw)>0",
                (self.account, before),
            )
            return int(cur.rowcount)

        return await self.store.run(tx)

    async def entries(self, states: Sequence[str] = (), limit: int = 100) -> list[OutboxEntry]:
        async def q(cur: Cur) -> list[OutboxEntry]:
            await cur.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE account=%s"
                " AND (cardinality(%s::text[])=0 OR state = ANY(%s::text[]))"
                " ORDER BY id DESC LIMIT %s",
                (self.account, list(states), list(states), limit),
            )
            return [_outbox_entry(v) for v in await cur.fetchall()]

        return await self.store.run(q)


class PgTokenStore:
    """The OAuth token record of one account, shared by every replica.

    Usable without the store being open (the CLI and the doctor): it then opens a
    pool of its own for each call. The refresh lock is ``SELECT ... FOR UPDATE
    NOWAIT`` on the account's lock row, held by one transaction for as long as the
    refresh takes (bounded by the token request's own deadline).
    """

    def __init__(self, store: PostgresStore, account: str) -> None:
        self.store = store
        self.account = account
        self.location = f"{store.location} (account {account})"

    @contextlib.asynccontextmanager
    async def _store(self) -> AsyncIterator[PostgresStore]:
        if self.store._pool is not None:
            yield self.store
            return
        async with PostgresStore(self.store.url, pool_size=1) as own:
            yield own

    async def load(self) -> TokenRecord | None:
        async def q(cur: Cur) -> str | None:
            await cur.execute("SELECT record FROM oauth_tokens WHERE account=%s", (self.account,))
            row = await cur.fetchone()
            return str(row[0]) if row else None

        async with self._store() as store:
            found = await store.run(q)
        if found is None:
            return None
        try:
            data = json.loads(found)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ChannelError(
                f"the token store {self.location} is damaged; run `prx-email auth login`",
                code="oauth_store_damaged",
            )
        return TokenRecord.from_json(data)

    async def version(self) -> object | None:
        async def q(cur: Cur) -> str | None:
            await cur.execute("SELECT version FROM oauth_tokens WHERE account=%s", (self.account,))
            row = await cur.fetchone()
            return str(row[0]) if row else None

        async with self._store() as store:
            return await store.run(q)

    async def save(self, record: TokenRecord) -> None:
        async def tx(cur: Cur) -> None:
            await cur.execute(
                "INSERT INTO oauth_tokens (account, record, version, updated_at)"
                " VALUES (%s,%s,%s,%s) ON CONFLICT (account) DO UPDATE SET"
                " record=excluded.record, version=excluded.version, updated_at=excluded.updated_at",
                (
                    self.account,
                    json.dumps(asdict(record), sort_keys=True),
                    secrets.token_hex(8),
                    time.time(),
                ),
            )

        async with self._store() as store:
            await store.run(tx)

    async def delete(self) -> bool:
        async def tx(cur: Cur) -> bool:
            await cur.execute("DELETE FROM oauth_tokens WHERE account=%s", (self.account,))
            return bool(cur.rowcount)

        async with self._store() as store:
            return await store.run(tx)

    async def private(self) -> bool:
        """Who may read the record is the database's access control, not a file mode."""
        return True

    @contextlib.asynccontextmanager
    async def locked(self, within: float) -> AsyncIterator[None]:
        from psycopg.errors import LockNotAvailable

        async with self._store() as store:
            await store.run(lambda cur: cur.execute(
                "INSERT INTO oauth_lock (account) VALUES (%s) ON CONFLICT DO NOTHING",
                (self.account,),
            ))  # fmt: skip
            deadline = time.monotonic() + within
            async with store.pool.connection() as conn:
                # Not autocommit: the first statement opens the transaction that holds
                # the row lock until the rollback below.
                while True:
                    try:
                        await conn.execute(
                            "SELECT 1 FROM oauth_lock WHERE account=%s FOR UPDATE NOWAIT",
                            (self.account,),
                        )
                        break
                    except LockNotAvailable:
                        await conn.rollback()
                        if time.monotonic() > deadline:
                            raise OAuthUnavailable(
                                "another replica holds the token store lock",
                                code="oauth_store_busy",
                            ) from None
                        await asyncio.sleep(0.05)
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):
                        await conn.rollback()


__all__ = ["LeaseLost", "PgOutbox", "PgTokenStore", "PostgresStore"]
