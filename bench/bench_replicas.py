"""Shared state for replicas: what PostgreSQL costs against SQLite, how fast a dead
replica's mailboxes move, and how much load the leases put on the database.

Run by hand (it starts a throwaway PostgreSQL cluster on loopback, like the tests):

    python bench/bench_replicas.py [--messages 2000] [--kills 10] [--lease 3]

Three parts, each against a baseline measured in the same run:

1. Hand-off throughput of the storage layer: per message, the commit the sync engine
   makes before it hands a mail on (one in-flight row and the cursor move) and the
   settle that an acknowledgement makes; SQLite (the default, fsync on) against
   PostgreSQL (fsync off in this throwaway cluster: the figure is the round trips'
   cost, not the disk's).
2. Failover: three replicas' lease keepers over 12 mailboxes; one is killed (its
   loop stops without giving anything back, as a SIGKILL does) and the time until
   every mailbox it served is served by another is measured, over ``--kills`` kills.
   The bound the contract states is lease_secs + 15 s.
3. Database load: transactions per second the keepers cause (pg_stat_database's
   xact_commit), idle, with 100 and with 1,000 mailboxes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psycopg_pool import AsyncConnectionPool

from prx_channel_email._storage import (
    Cursor,
    HandoffBatch,
    InFlight,
    LedgerEntry,
    Mailbox,
    MailKey,
    Storage,
    open_storage,
)
from tests.servers.postgres import PostgresServer
from tests.test_leases import _Replica as Replica

BOX = Mailbox("support", "INBOX")


async def handoff_rate(store: Storage, count: int) -> float:
    """Messages per second through commit-before-put and the ack's settle."""
    start = time.perf_counter()
    for uid in range(1, count + 1):
        key = MailKey(BOX.account, BOX.folder, 1, uid)
        entry = LedgerEntry(f"<{uid}@b>", "a@example.org", "a@example.org", "s", f"<{uid}@b>",
                            [], time.time(), key)  # fmt: skip
        await store.commit_handoff(
            HandoffBatch(BOX, in_flight=[InFlight(key, entry, "{}")], cursors=[Cursor(1, uid)])
        )
        await store.settle([key])
    return count / (time.perf_counter() - start)


async def part_throughput(pg: PostgresServer, count: int) -> None:
    rates: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    for _round in range(3):  # alternated, so a slow moment hits both
        with tempfile.TemporaryDirectory() as tmp:
            async with open_storage(Path(tmp)) as lite:
                rates["sqlite"].append(await handoff_rate(lite, count))
        async with open_storage(Path("."), url=pg.url(pg.new_database())) as shared:
            rates["postgres"].append(await handoff_rate(shared, count))
    best = {k: max(v) for k, v in rates.items()}
    print(f"1. hand-off throughput ({count} messages, best of 3 alternated rounds)")
    for name, rate in best.items():
        print(f"   {name:9s} {rate:8.0f} msg/s")
    print(f"   postgres / sqlite = {best['postgres'] / best['sqlite']:.2f}")


async def _until(check: Any, timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError("not reached")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def part_failover(pg: PostgresServer, kills: int, lease: float) -> None:
    db = pg.new_database()
    url = pg.url(db)
    async with open_storage(Path("."), url=url):  # schema, leases table
        pass
    pool = AsyncConnectionPool(url, min_size=1, max_size=6, open=False,
                               kwargs={"prepare_threshold": None})  # fmt: skip
    await pool.open(wait=True, timeout=30)
    boxes = [(f"acct{i // 3}", f"F{i % 3}") for i in range(12)]
    replicas = [Replica(pool, f"r{i}", lease, boxes) for i in range(3)]
    times: list[float] = []
    try:
        for n in range(kills):
            await _until(lambda: sorted(m for r in replicas for m in r.serving) == sorted(boxes),
                         4 * lease + 30)  # fmt: skip
            victim = replicas[n % 3]
            moved = set(victim.serving)
            killed_at = time.monotonic()
            await victim.kill()
            others = [r for r in replicas if r is not victim]

            def moved_over(moved: set[tuple[str, str]] = moved, others: list[Replica] = others)\
                    -> bool:  # fmt: skip
                return moved <= set().union(*(r.serving for r in others))

            await _until(moved_over, lease + 30)
            times.append(time.monotonic() - killed_at)
            replicas[n % 3] = Replica(pool, f"r{n % 3}-{n}", lease, boxes)
    finally:
        for r in replicas:
            await r.kill()
        await pool.close()
    print(f"2. failover over {kills} kills, lease_secs={lease:g} (bound: lease + 15 s)")
    print(f"   median {statistics.median(times):.2f} s, max {max(times):.2f} s")


async def _commits(pool: Any, db: str) -> int:
    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname=%s", (db,))
        row = await cur.fetchone()
        return int(row[0])


async def part_load(pg: PostgresServer, lease: float, seconds: float) -> None:
    print(f"3. database load of 3 replicas' lease keepers (lease_secs={lease:g}),"
          f" idle, over {seconds:g} s")  # fmt: skip
    for count in (100, 1000):
        db = pg.new_database()
        url = pg.url(db)
        async with open_storage(Path("."), url=url):
            pass
        pool = AsyncConnectionPool(url, min_size=1, max_size=6, open=False,
                                   kwargs={"prepare_threshold": None})  # fmt: skip
        await pool.open(wait=True, timeout=30)
        boxes = [(f"a{i // 10}", f"F{i % 10}") for i in range(count)]
        replicas = [Replica(pool, f"r{i}", lease, boxes) for i in range(3)]
        await _until(lambda: sum(len(r.serving) for r in replicas) == count, 4 * lease + 30)  # noqa: B023
        await asyncio.sleep(lease)  # settled
        before = await _commits(pool, db)
        await asyncio.sleep(seconds)
        after = await _commits(pool, db)
        for r in replicas:
            await r.kill()
        await pool.close()
        tps = (after - before - 2) / seconds  # the two reads of the counter commit too
        print(f"   {count:5d} mailboxes: {tps:6.1f} tx/s ({tps / count * 100:.2f} per 100"
              " mailboxes)")  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--lease", type=float, default=3.0)
    ap.add_argument("--load-seconds", type=float, default=20.0)
    args = ap.parse_args()
    with PostgresServer() as pg:
        await part_throughput(pg, args.messages)
        await part_failover(pg, args.kills, args.lease)
        await part_load(pg, args.lease, args.load_seconds)


if __name__ == "__main__":
    asyncio.run(main())
