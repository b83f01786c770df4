"""Mailbox leases on a real PostgreSQL: expiry, renewal, epoch fencing, a stale write
refused, and the same through a transaction-pooling PgBouncer.

What a user would notice if any of these broke: two replicas serving one mailbox (mail
handed on or answered twice), or a mailbox nobody serves after a replica died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
psycopg_pool = pytest.importorskip("psycopg_pool")

from prx_channel_email._storage.postgres.keeper import LeaseKeeper  # noqa: E402
from prx_channel_email._storage.postgres.leases import (  # noqa: E402
    LEASES_DDL,
    Lease,
    LeaseLost,
    LeaseTable,
    fence,
    share,
)
from tests.servers.postgres import PgBouncer, PostgresServer  # noqa: E402

MAILBOXES = [("support", "INBOX"), ("support", "Escalations"), ("billing", "INBOX")]


async def _pool(url: str) -> Any:
    pool = psycopg_pool.AsyncConnectionPool(
        url, min_size=1, max_size=4, open=False, timeout=10,
        kwargs={"prepare_threshold": None, "connect_timeout": 10},
    )  # fmt: skip
    await pool.open(wait=True, timeout=10)
    return pool


@pytest.fixture(params=["direct", "pgbouncer"])
async def pool(
    request: pytest.FixtureRequest, postgres: PostgresServer, pgbouncer: PgBouncer
) -> AsyncIterator[Any]:
    db = postgres.new_database()
    postgres.psql(LEASES_DDL + "CREATE TABLE cursor_probe (account TEXT, v INT);", db)
    url = postgres.url(db) if request.param == "direct" else pgbouncer.url(db)
    p = await _pool(url)
    try:
        yield p
    finally:
        await p.close()


async def _until(what: Any, timeout: float = 10.0) -> Any:
    """Call ``what()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = await what()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s")
        await asyncio.sleep(0.05)


async def _write(pool: Any, lease: Lease, value: int) -> None:
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        await fence(cur, lease)
        await cur.execute("INSERT INTO cursor_probe VALUES (%s, %s)", (lease.account, value))


async def _values(pool: Any) -> list[int]:
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.execute("SELECT v FROM cursor_probe ORDER BY v")
        return [r[0] for r in await cur.fetchall()]


async def test_a_free_mailbox_is_taken_once_and_a_held_one_is_not_taken(pool: Any) -> None:
    a = LeaseTable(pool, lease_secs=30)
    got_a = await a.acquire("A", MAILBOXES, limit=2)
    assert [x.mailbox for x in got_a] == MAILBOXES[:2]
    assert all(x.epoch == 1 and x.owner == "A" for x in got_a)
    got_b = await a.acquire("B", MAILBOXES, limit=3)
    assert [x.mailbox for x in got_b] == MAILBOXES[2:], "B must not take A's live leases"
    holders = await a.holders()
    assert {m: h.owner for m, h in holders.items()} == {
        MAILBOXES[0]: "A",
        MAILBOXES[1]: "A",
        MAILBOXES[2]: "B",
    }


async def test_an_unrenewed_lease_runs_out_and_the_takeover_bumps_the_epoch(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=0.5)
    (held,) = await table.acquire("A", MAILBOXES[:1], limit=1)
    taken = await _until(lambda: table.acquire("B", MAILBOXES[:1], limit=1))
    assert taken[0].owner == "B" and taken[0].epoch == held.epoch + 1
    assert await table.renew([held]) == [], "A's renewal after the take-over must fail"


async def test_renewal_keeps_the_lease_past_its_original_expiry(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=1.0)
    (held,) = await table.acquire("A", MAILBOXES[:1], limit=1)
    start = time.monotonic()
    while time.monotonic() - start < 2.5:  # 2.5 lease periods, renewed every third
        assert await table.renew([held]) == [held]
        assert await table.acquire("B", MAILBOXES[:1], limit=1) == []
        await asyncio.sleep(0.3)


async def test_a_write_under_a_lost_lease_is_refused_and_changes_nothing(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=0.5)
    (old,) = await table.acquire("A", MAILBOXES[:1], limit=1)
    await _write(pool, old, 1)
    (new,) = await _until(lambda: table.acquire("B", MAILBOXES[:1], limit=1))
    with pytest.raises(LeaseLost) as err:
        await _write(pool, old, 2)
    assert err.value.code == "lease_lost"
    await _write(pool, new, 3)
    assert await _values(pool) == [1, 3]


async def test_a_stale_epoch_is_refused_even_when_its_owner_holds_the_mailbox_again(
    pool: Any,
) -> None:
    table = LeaseTable(pool, lease_secs=0.3)
    (first,) = await table.acquire("A", MAILBOXES[:1], limit=1)
    await _until(lambda: table.acquire("B", MAILBOXES[:1], limit=1))
    (again,) = await _until(lambda: table.acquire("A", MAILBOXES[:1], limit=1))
    assert again.epoch == first.epoch + 2
    with pytest.raises(LeaseLost):
        await _write(pool, first, 1)  # A froze with the old token and woke up
    await _write(pool, again, 2)
    assert await _values(pool) == [2]


async def test_a_takeover_waits_for_a_write_that_is_under_way(pool: Any) -> None:
    """The write began under a valid lease: it commits, and only then can B take over."""
    table = LeaseTable(pool, lease_secs=1.0)
    (held,) = await table.acquire("A", MAILBOXES[:1], limit=1)
    in_tx = asyncio.Event()
    finish = asyncio.Event()

    async def slow_write() -> None:
        async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await fence(cur, held)
            await cur.execute("INSERT INTO cursor_probe VALUES ('x', 7)")
            in_tx.set()
            await asyncio.wait_for(finish.wait(), 10)

    writer = asyncio.create_task(slow_write())
    await asyncio.wait_for(in_tx.wait(), 10)
    # The lease runs out while the write is open; a take-over attempt skips the locked row.
    await asyncio.sleep(1.2)
    assert await table.acquire("B", MAILBOXES[:1], limit=1) == []
    finish.set()
    await asyncio.wait_for(writer, 10)
    (taken,) = await _until(lambda: table.acquire("B", MAILBOXES[:1], limit=1))
    assert taken.epoch == held.epoch + 1
    assert await _values(pool) == [7]


async def test_a_released_lease_is_free_at_once(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=60)
    held = await table.acquire("A", MAILBOXES, limit=3)
    await table.release(held[:1])
    got = await table.acquire("B", MAILBOXES, limit=3)
    assert [x.mailbox for x in got] == MAILBOXES[:1]
    with pytest.raises(LeaseLost):
        await _write(pool, held[0], 1)


async def test_the_heartbeat_counts_live_replicas_only(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=0.5)
    assert await table.heartbeat("A") == 1
    assert await table.heartbeat("B") == 2
    # A stops beating: after one lease period only B counts.
    assert await _until(lambda: _count_is(table, "B", 1))
    await table.leave("B", [])
    assert await table.heartbeat("C") == 1


async def _count_is(table: LeaseTable, replica: str, n: int) -> bool:
    return await table.heartbeat(replica) == n


def test_share_is_the_ceiling_of_mailboxes_per_live_replica() -> None:
    assert share(12, 3) == 4
    assert share(13, 3) == 5
    assert share(5, 0) == 5
    assert share(0, 4) == 0


# --- the keeper: shares, failover, a frozen holder ------------------------------------

MANY = [(f"acct{i // 3}", f"F{i % 3}") for i in range(12)]


class _Replica:
    """One keeper and what it serves, as the channel would see it."""

    def __init__(
        self, pool: Any, name: str, lease_secs: float, mailboxes: list[tuple[str, str]] = MANY
    ) -> None:
        self.serving: set[tuple[str, str]] = set()
        self.keeper = LeaseKeeper(LeaseTable(pool, lease_secs=lease_secs), name, mailboxes,
                                  on_gain=self._gain, on_loss=self._loss)  # fmt: skip
        self.task = asyncio.create_task(self.keeper.run())

    async def _gain(self, lease: Lease) -> None:
        self.serving.add(lease.mailbox)

    async def _loss(self, lease: Lease) -> None:
        self.serving.discard(lease.mailbox)

    async def kill(self) -> None:
        """Dies: stops renewing, gives nothing back."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _balanced(replicas: list[_Replica]) -> bool:
    served = [m for r in replicas for m in r.serving]
    if sorted(served) != sorted(MANY):  # every mailbox by exactly one
        return False
    return all(len(r.serving) <= share(len(MANY), len(replicas)) for r in replicas)


async def _until_true(check: Any, timeout: float) -> None:
    async def probe() -> bool:
        return bool(check())

    await _until(probe, timeout)


# The bounds below are the contract's (a joining replica's share within 2 leases, a dead
# one's mailboxes within lease + a tick) plus SLACK for a loaded test machine.
SLACK = 15.0


async def test_replicas_share_the_mailboxes_and_take_over_from_a_dead_one(pool: Any) -> None:
    lease = 2.0
    a, b = _Replica(pool, "A", lease), _Replica(pool, "B", lease)
    c: _Replica | None = None
    try:
        await _until_true(lambda: _balanced([a, b]), 2 * lease + SLACK)
        assert len(a.serving) == len(b.serving) == 6
        # A third joins: it gets its share within two lease periods.
        c = _Replica(pool, "C", lease)
        await _until_true(lambda: _balanced([a, b, c]), 2 * lease + SLACK)
        assert {len(r.serving) for r in (a, b, c)} == {4}
        # B dies: its mailboxes are served by the others within lease + one tick.
        lost = set(b.serving)
        await b.kill()
        await _until_true(lambda: lost <= a.serving | c.serving, lease + lease / 3 + SLACK)
        await _until_true(lambda: _balanced([a, c]), 2 * lease + SLACK)
    finally:
        for r in (a, b, c):
            if r is not None:
                await r.kill()


async def test_a_frozen_holder_knows_its_leases_are_gone_before_asking_anyone(pool: Any) -> None:
    lease = 2.0
    a = _Replica(pool, "A", lease)
    try:
        await _until_true(lambda: len(a.serving) == len(MANY), lease + SLACK)
        mailbox = MANY[0]
        assert a.keeper.lease(mailbox) is not None
        await a.kill()  # its loop stops, as in SIGSTOP
        await _until_true(lambda: a.keeper.lease(mailbox) is None, lease + SLACK)
        # A second replica takes it over, and the frozen one's old token is refused.
        b = _Replica(pool, "B", lease)
        await _until_true(lambda: mailbox in b.serving, 2 * lease + SLACK)
        with pytest.raises(LeaseLost):
            await _write(pool, a.keeper.held[mailbox], 1)
        await b.kill()
    finally:
        await a.kill()


async def test_a_clean_stop_hands_the_mailboxes_over_at_once(pool: Any) -> None:
    lease = 30.0  # far longer than the test: only a clean hand-over can pass it
    a = _Replica(pool, "A", lease)
    await _until_true(lambda: len(a.serving) == len(MANY), 5)
    await a.kill()
    await a.keeper.leave()
    b = _Replica(pool, "B", lease)
    try:
        await _until_true(lambda: len(b.serving) == len(MANY), 5)
    finally:
        await b.kill()


# --- the database restarts, or the network between a replica and it splits -----------


async def test_a_database_restart_keeps_the_mailboxes_served(
    postgres: PostgresServer, tmp_path: Any
) -> None:
    db = postgres.new_database()
    postgres.psql(LEASES_DDL, db)
    p = await _pool(postgres.url(db))
    lease = 3.0
    a = _Replica(p, "A", lease)
    try:
        await _until_true(lambda: len(a.serving) == len(MANY), lease + SLACK)
        postgres.restart()  # fast shutdown: every connection of the pool is cut
        # The keeper reconnects and renews; at worst it loses and takes back its leases:
        # after one more lease period every mailbox is served again, by A alone.
        await _until_true(lambda: a.keeper.ticked.is_set(), SLACK)
        a.keeper.ticked.clear()
        await _until_true(lambda: a.keeper.ticked.is_set(), lease + SLACK)
        await _until_true(lambda: len(a.serving) == len(MANY), 2 * lease + SLACK)
        holders = await LeaseTable(p, lease_secs=lease).holders()
        assert {h.owner for h in holders.values()} == {"A"}
    finally:
        await a.kill()
        await p.close()


async def test_a_replica_cut_off_from_the_database_stops_and_another_takes_over(
    postgres: PostgresServer, proxy: Any
) -> None:
    db = postgres.new_database()
    postgres.psql(LEASES_DDL, db)
    link = proxy(postgres.host, postgres.port)
    host, port = link.address
    cut_off = await _pool(postgres.url(db, host=host, port=port))
    direct = await _pool(postgres.url(db))
    lease = 2.0
    a = _Replica(cut_off, "A", lease)
    b: _Replica | None = None
    try:
        await _until_true(lambda: len(a.serving) == len(MANY), lease + SLACK)
        link.freeze()  # the network splits: A's statements get no answer
        # A stops serving once its lease ran out by its own clock, without the database.
        await _until_true(lambda: not a.serving, lease + SLACK)
        b = _Replica(direct, "B", lease)
        await _until_true(lambda: len(b.serving) == len(MANY), 2 * lease + SLACK)
        assert not a.serving, "A must not serve again while B holds the mailboxes"
    finally:
        link.thaw()
        for r in (a, b):
            if r is not None:
                await r.kill()
        await cut_off.close()
        await direct.close()


async def test_replicas_taking_many_new_mailboxes_at_once_do_not_deadlock(pool: Any) -> None:
    table = LeaseTable(pool, lease_secs=30)
    for rnd in range(3):
        boxes = [(f"a{rnd}-{i}", "INBOX") for i in range(2000)]
        # Each replica prefers its own order, as the keeper's rendezvous order does.
        orders = [boxes, boxes[::-1], boxes[1000:] + boxes[:1000]]
        got = await asyncio.gather(
            *(table.acquire(f"R{i}", order, limit=700) for i, order in enumerate(orders))
        )
        taken = [lease.mailbox for leases in got for lease in leases]
        assert len(taken) == len(set(taken)) == 2000
