"""What refused mail costs the SQLite state, and what the prune gives back (issue 23,
item 10: "1,500 strangers with 8 KB ids added 34 MB").

Refusals are written the way the sync engine writes them: ``LedgerWriter.record``
per mail, one commit per fetch step (50). The state file is measured after a WAL
checkpoint (file + WAL). The baseline in the same run is the same number of
refusals with ordinary 40-character ids.

    PYTHONPATH=$PWD python bench/bench_refused_ledger.py [--count 1500] [--id-chars 8000]

Run it with ``PYTHONPATH`` pointing at an older checkout to get its figures (the
prune lines then say "n/a").
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
from pathlib import Path

from prx_channel_email._handoff.ledger import HandoffLedger, LedgerWriter
from prx_channel_email._storage import Cursor, Mailbox
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore
from prx_channel_email._support.observability import Metrics

ACCOUNT, FOLDER, UV = "bot@example.test", "INBOX", 7
STEP = 50  # fetch_batch_size: one commit per step, as the sync engine does


def state_bytes(state: Path) -> int:
    """The state file after a checkpoint (the WAL folded in), plus what WAL is left."""
    with sqlite3.connect(state / DB_NAME) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = state / (DB_NAME + "-wal")
    return (state / DB_NAME).stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def free_pages(state: Path) -> int:
    with sqlite3.connect(state / DB_NAME) as db:
        return int(db.execute("PRAGMA freelist_count").fetchone()[0])


async def refuse(store: StateStore, first_uid: int, count: int, id_chars: int) -> None:
    writer = LedgerWriter(store, ACCOUNT, FOLDER, Metrics())
    writer.begin(UV)
    for uid in range(first_uid, first_uid + count):
        local = f"{uid}-".ljust(id_chars, "x")
        writer.record(uid, f"<{local}@evil.example>", "rejected", "not_allowed")
        if uid % STEP == 0:
            await writer.flush()
    await writer.flush()


async def one(count: int, id_chars: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        async with StateStore(state) as store:
            await store.set_cursor(Mailbox(ACCOUNT, FOLDER), Cursor(UV, 0))
            empty = state_bytes(state)
            await refuse(store, 1, count, id_chars)
            full = state_bytes(state)
            result = {"added": full - empty}
            if not hasattr(store, "prune_refused"):
                return result
            ledger = HandoffLedger(store, ACCOUNT)
            result["pruned"] = await ledger.prune_refused(0)
            result["after_prune"] = state_bytes(state) - empty
            result["free_pages"] = free_pages(state)
            # The freed pages are reused: the next as many refusals barely grow the file.
            await refuse(store, count + 1, count, id_chars)
            result["regrowth"] = state_bytes(state) - full
            return result


def mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--id-chars", type=int, default=8000)
    args = parser.parse_args()
    base = await one(args.count, 40)
    hostile = await one(args.count, args.id_chars)
    added = hostile["added"]
    print(f"{args.count} refused mails, ids of 40 chars:   added {mb(base['added'])}")
    print(f"{args.count} refused mails, ids of {args.id_chars} chars: added {mb(added)}"
          f" ({added / args.count:.0f} B per mail;"
          f" {added / max(1, base['added']):.1f}x the baseline)")  # fmt: skip
    print(f"prune_refused: {hostile.get('pruned', 'n/a')} rows;"
          f" file then {mb(hostile.get('after_prune'))} above empty,"
          f" {hostile.get('free_pages', 'n/a')} free pages;"
          f" {args.count} more refusals then grow it by {mb(hostile.get('regrowth'))}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
