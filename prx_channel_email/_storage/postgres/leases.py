"""Mailbox ownership for replicas sharing one PostgreSQL: leases with a fencing token.

Each mailbox (account, folder) has one row in ``mailbox_lease``: the replica that owns
it, an ``epoch`` and an expiry. Why each piece is there:

- **Expiry, on the database's clock.** Every time is ``now()`` of the database, so
  replicas on machines whose clocks disagree still agree on who owns what. An owner
  renews every ``lease_secs / 3``; a replica that died or froze stops renewing and its
  leases run out.
- **Epoch (the fencing token).** Taking a lease over bumps the epoch. Every write a
  replica makes for a mailbox names the epoch it holds and is checked *inside the same
  transaction* (:func:`fence`), with the lease row locked ``FOR SHARE`` so a take-over
  waits for that transaction to end. A replica that froze past its lease wakes up with
  an old epoch: its first write is refused, and it stops serving the mailbox.
- **No session state.** Nothing here uses advisory locks, temporary tables, prepared
  statements or ``SET``: each operation is one short transaction, so it works the same
  through a transaction-pooling PgBouncer, where a client's next transaction may run
  on another server session.
- **Balance.** Live replicas write a heartbeat row; each one aims at
  ``ceil(M / R)`` mailboxes (:func:`share`): one over it releases the surplus, one under
  it takes free or expired leases. A joining replica is counted at the others' next
  tick, so it gets its share within two lease periods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prx_channel_email._storage.interface import LeaseLost

# Named like the other migrations; PostgreSQL-only (SQLite serves one process).
LEASES_DDL = """
CREATE TABLE IF NOT EXISTS mailbox_lease (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account, folder)
);
CREATE TABLE IF NOT EXISTS replica (
    replica_id TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL
);
"""


@dataclass(frozen=True)
class Lease:
    """A mailbox this replica owns, and the fencing token every write must carry."""

    account: str
    folder: str
    owner: str
    epoch: int

    @property
    def mailbox(self) -> tuple[str, str]:
        return (self.account, self.folder)


@dataclass(frozen=True)
class Holder:
    """Who serves a mailbox, as the table says (for status pages)."""

    owner: str
    epoch: int
    expires_in: float  # seconds; negative when it ran out


def share(mailboxes: int, replicas: int) -> int:
    """How many mailboxes one of ``replicas`` live replicas should serve."""
    return math.ceil(mailboxes / max(replicas, 1))


async def fence(cur: Any, lease: Lease) -> None:
    """Inside a write transaction: refuse it unless ``lease`` is still held."""
    await fence_epoch(cur, lease.account, lease.folder, lease.epoch)


async def fence_epoch(cur: Any, account: str, folder: str, epoch: int) -> None:
    """Inside a write transaction: refuse it (:class:`LeaseLost`, nothing written)
    unless the mailbox's lease still carries ``epoch`` and has not run out.

    The epoch alone names the holder (every take-over bumps it). The row is locked FOR
    SHARE: a take-over (an UPDATE of the row) waits until this transaction ends, so a
    write that commits was made under a lease that was valid when the transaction
    began and was not taken over before COMMIT.
    """
    await cur.execute(
        "SELECT 1 FROM mailbox_lease WHERE account=%s AND folder=%s"
        " AND epoch=%s AND expires_at > now() FOR SHARE",
        (account, folder, epoch),
    )
    if await cur.fetchone() is None:
        raise LeaseLost(
            f"this replica no longer owns {account}/{folder} (epoch {epoch}): the write was refused"
        )


class LeaseTable:
    """The lease operations, each one short transaction on a pooled connection.

    ``pool`` is a ``psycopg_pool.AsyncConnectionPool`` (any object whose
    ``connection()`` is an async context manager yielding an AsyncConnection).
    """

    def __init__(self, pool: Any, *, lease_secs: float) -> None:
        self.pool = pool
        self.lease_secs = float(lease_secs)

    async def heartbeat(self, replica_id: str) -> int:
        """Record that ``replica_id`` is alive; returns how many replicas are."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "INSERT INTO replica (replica_id, seen_at) VALUES (%s, now())"
                " ON CONFLICT (replica_id) DO UPDATE SET seen_at = now()",
                (replica_id,),
            )
            await cur.execute(
                "SELECT count(*) FROM replica WHERE seen_at > now() - make_interval(secs => %s)",
                (self.lease_secs,),
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 1

    async def leave(self, replica_id: str, leases: Iterable[Lease]) -> None:
        """A clean stop: give the leases back at once and drop out of the count."""
        await self.release(leases)
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute("DELETE FROM replica WHERE replica_id=%s", (replica_id,))

    async def renew(self, leases: Sequence[Lease]) -> list[Lease]:
        """Extend every lease still held (same epoch); returns those. The others are lost."""
        if not leases:
            return []
        accounts = [lease.account for lease in leases]
        folders = [lease.folder for lease in leases]
        epochs = [lease.epoch for lease in leases]
        owner = leases[0].owner
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "UPDATE mailbox_lease AS l SET expires_at = now() + make_interval(secs => %s)"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS h(account, folder, epoch)"
                " WHERE l.account = h.account AND l.folder = h.folder AND l.epoch = h.epoch"
                " AND l.owner = %s AND l.expires_at > now()"
                " RETURNING l.account, l.folder, l.epoch",
                (self.lease_secs, accounts, folders, epochs, owner),
            )
            kept = {(r[0], r[1], int(r[2])) for r in await cur.fetchall()}
        return [lease for lease in leases if (lease.account, lease.folder, lease.epoch) in kept]

    async def acquire(
        self, owner: str, candidates: Sequence[tuple[str, str]], *, limit: int
    ) -> list[Lease]:
        """Take up to ``limit`` of ``candidates`` that nobody holds (or whose lease ran out).

        A take-over bumps the epoch, so the previous owner's writes are refused from now
        on. Rows held by a live owner are skipped without waiting (SKIP LOCKED).
        """
        if limit <= 0 or not candidates:
            return []
        accounts = [c[0] for c in candidates]
        folders = [c[1] for c in candidates]
        # New rows go in one fixed order: replicas inserting overlapping sets in their
        # own preference orders would otherwise deadlock on each other's row locks.
        fresh = sorted(set(candidates))
        taken: list[Lease] = []
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            # New mailboxes get a row first (epoch 0, already expired), so every take is
            # the same UPDATE below.
            await cur.execute(
                "INSERT INTO mailbox_lease (account, folder, owner, epoch, expires_at)"
                " SELECT account, folder, '', 0, '-infinity'"
                " FROM unnest(%s::text[], %s::text[]) AS c(account, folder)"
                " ON CONFLICT (account, folder) DO NOTHING",
                ([c[0] for c in fresh], [c[1] for c in fresh]),
            )
            await cur.execute(
                "WITH free AS ("
                "  SELECT l.account, l.folder FROM mailbox_lease l"
                "  JOIN unnest(%s::text[], %s::text[], %s::int[]) AS c(account, folder, pos)"
                "    ON l.account = c.account AND l.folder = c.folder"
                "  WHERE l.expires_at <= now() ORDER BY c.pos LIMIT %s"
                "  FOR UPDATE OF l SKIP LOCKED)"
                " UPDATE mailbox_lease AS l SET owner = %s, epoch = l.epoch + 1,"
                "  expires_at = now() + make_interval(secs => %s)"
                " FROM free WHERE l.account = free.account AND l.folder = free.folder"
                " RETURNING l.account, l.folder, l.epoch",
                (accounts, folders, list(range(len(candidates))), limit, owner, self.lease_secs),
            )
            for account, folder, epoch in await cur.fetchall():
                taken.append(Lease(account, folder, owner, int(epoch)))
        return taken

    async def release(self, leases: Iterable[Lease]) -> None:
        """Give leases back (they expire now), so another replica can take them at once."""
        held = list(leases)
        if not held:
            return
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "UPDATE mailbox_lease AS l SET expires_at = '-infinity'"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS h(account, folder, epoch)"
                " WHERE l.account = h.account AND l.folder = h.folder AND l.epoch = h.epoch"
                " AND l.owner = %s",
                (
                    [x.account for x in held],
                    [x.folder for x in held],
                    [x.epoch for x in held],
                    held[0].owner,
                ),
            )

    async def holders(self) -> dict[tuple[str, str], Holder]:
        """Every lease row: who serves which mailbox (status pages, the doctor)."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "SELECT account, folder, owner, epoch,"
                " extract(epoch FROM (expires_at - now()))::float8 FROM mailbox_lease"
                " WHERE expires_at > '-infinity'"
            )
            rows = await cur.fetchall()
        return {(r[0], r[1]): Holder(r[2], int(r[3]), float(r[4])) for r in rows}
