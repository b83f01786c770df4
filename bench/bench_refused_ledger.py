"""What refused mail costs the SQLite state, and what the prune gives back (issue 23,
item 10: "1,500 strangers with 8 KB ids added 34 MB").

Two measures, each with a baseline in the same run:

* ``store``: refusals written the way the sync engine writes them
  (``LedgerWriter.record`` per mail, one commit per fetch step of 50) into a fresh
  state; the file measured after a WAL checkpoint. Baseline: the same number of
  refusals with ordinary 40-character ids.
* ``e2e``: a channel listening on a real Dovecot (started like the test fixture)
  gets the strangers' mail by LMTP, then one allowed mail (handed on last: every
  refusal before it is decided). The state directory is measured as it is on disk
  (file + WAL) and after a checkpoint. Then, where the code has the prune, the
  channel is restarted with ``refused_retention_days = 0``: its start-time
  housekeeping prunes, nothing comes back (no hand-on, no ``on_rejected``), and as
  many strangers again grow the file by what the freed pages do not absorb.

    PYTHONPATH=$PWD python bench/bench_refused_ledger.py [--count 1500] [--id-chars 8000]
        [--mode store|e2e|both]

Run it with ``PYTHONPATH`` pointing at an older checkout to get its figures (the
prune lines then say "n/a").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import smtplib
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # tests.servers; the package from PYTHONPATH

from prx_channel_email import EmailConfig  # noqa: E402
from prx_channel_email._handoff.ledger import HandoffLedger, LedgerWriter  # noqa: E402
from prx_channel_email._storage import Cursor, Mailbox  # noqa: E402
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore  # noqa: E402
from prx_channel_email._support.observability import Metrics  # noqa: E402
from tests.servers.dovecot import Account, DovecotServer  # noqa: E402
from tests.test_host_senders import Run, listening  # noqa: E402

ACCOUNT, FOLDER, UV = "bot@example.test", "INBOX", 7
STEP = 50  # fetch_batch_size: one commit per step, as the sync engine does
ALICE = "alice@example.org"


def on_disk(state: Path) -> int:
    """The state file and its WAL, as they are."""
    return sum(p.stat().st_size for p in state.glob(DB_NAME + "*") if p.is_file())


def checkpointed(state: Path) -> int:
    """The state after a checkpoint (the WAL folded into the file)."""
    with sqlite3.connect(state / DB_NAME) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return on_disk(state)


def rows(state: Path, outcome: str) -> int:
    with sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True) as db:
        return int(
            db.execute("SELECT count(*) FROM ledger WHERE outcome=?", (outcome,)).fetchone()[0]
        )


def mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def stranger_id(n: int, id_chars: int) -> str:
    return "<" + f"{n}-".ljust(id_chars, "x") + "@evil.example>"


# --- store: the ledger alone ----------------------------------------------------------


async def refuse(store: StateStore, first_uid: int, count: int, id_chars: int) -> None:
    writer = LedgerWriter(store, ACCOUNT, FOLDER, Metrics())
    writer.begin(UV)
    for uid in range(first_uid, first_uid + count):
        writer.record(uid, stranger_id(uid, id_chars), "rejected", "not_allowed")
        if uid % STEP == 0:
            await writer.flush()
    await writer.flush()


async def store_run(count: int, id_chars: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        async with StateStore(state) as store:
            await store.set_cursor(Mailbox(ACCOUNT, FOLDER), Cursor(UV, 0))
            empty = checkpointed(state)
            await refuse(store, 1, count, id_chars)
            full = checkpointed(state)
            result = {"added": full - empty}
            if not hasattr(store, "prune_refused"):
                return result
            result["pruned"] = await HandoffLedger(store, ACCOUNT).prune_refused(0)
            # The freed pages are reused: as many refusals again barely grow the file.
            await refuse(store, count + 1, count, id_chars)
            result["regrowth"] = checkpointed(state) - full
            return result


async def bench_store(count: int, id_chars: int) -> None:
    base = await store_run(count, 40)
    hostile = await store_run(count, id_chars)
    added = hostile["added"]
    print(f"[store] {count} refusals, 40-char ids: added {mb(base['added'])}")
    print(
        f"[store] {count} refusals, {id_chars}-char ids: added {mb(added)}"
        f" ({added / count:.0f} B a mail; {added / max(1, base['added']):.1f}x the baseline)"
    )
    regrowth = mb(hostile.get("regrowth"))
    print(f"[store] prune_refused(retention 0): {hostile.get('pruned', 'n/a')} rows;"
          f" {count} more refusals then grow the file by {regrowth}")  # fmt: skip


# --- e2e: a channel on real Dovecot ----------------------------------------------------


def stranger_mail(n: int, id_chars: int) -> bytes:
    return (f"From: <s{n}@evil.example>\r\nTo: bot\r\nSubject: hi {n}\r\n"
            f"Message-ID: {stranger_id(n, id_chars)}\r\n\r\nbuy now\r\n").encode()  # fmt: skip


def alice_mail(n: int) -> bytes:
    return (f"From: <{ALICE}>\r\nTo: bot\r\nSubject: hello {n}\r\n"
            f"Message-ID: <alice-{n}@example.org>\r\n\r\nhi\r\n").encode()  # fmt: skip


def lmtp(server: DovecotServer, account: Account, messages: list[bytes]) -> None:
    with smtplib.LMTP(server.host, server.lmtp_port, local_hostname="localhost") as conn:
        for raw in messages:
            conn.sendmail("sender@example.org", [account.address], raw)


async def until(check: Callable[[], bool], within: float = 600.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise TimeoutError("not done in time")
        await asyncio.sleep(0.05)


def refused(run: Run) -> int:
    """Strangers' mail judged and refused in this run (counted as it is judged)."""
    return run.channel.metrics.get("inbound.skipped.not_allowed")


async def e2e_run(server: DovecotServer, tmp: Path, count: int, id_chars: int) -> dict[str, int]:
    account = server.add_user()
    state = tmp / f"state-{id_chars}"
    fields: dict[str, Any] = {
        "imap_host": "127.0.0.1", "imap_port": server.imaps_port, "smtp_host": "127.0.0.1",
        "username": account.username, "password": account.password,
        "from_address": account.address, "ca_file": server.ca_file, "state_dir": state,
        "allowed_senders": [ALICE], "sender_auth": "off", "handoff": "queue",
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    async with listening(EmailConfig(**fields)) as run:
        empty = checkpointed(state)
        mails = [stranger_mail(n, id_chars) for n in range(count)] + [alice_mail(1)]
        await loop.run_in_executor(None, lmtp, server, account, mails)
        assert (await asyncio.wait_for(run.queue.get(), 600)).id == "<alice-1@example.org>"
        await until(lambda: refused(run) >= count)  # UIDs need not follow delivery order
        result = {"added_on_disk": on_disk(state) - empty}
    result["added"] = checkpointed(state) - empty
    result["refused_rows"] = rows(state, "rejected")
    if "refused_retention_days" not in EmailConfig.model_fields:
        return result
    full = checkpointed(state)
    async with listening(EmailConfig(**fields, refused_retention_days=0)) as run:
        result["refused_rows_after_restart"] = rows(state, "rejected")
        mails = [stranger_mail(n, id_chars) for n in range(count, 2 * count)] + [alice_mail(2)]
        await loop.run_in_executor(None, lmtp, server, account, mails)
        got = await asyncio.wait_for(run.queue.get(), 600)
        assert got.id == "<alice-2@example.org>", got.id  # nothing old came back first
        await until(lambda: refused(run) >= count)
        # Old mail judged again would have lower UIDs than the new: counted by now.
        result["rejected_again"] = refused(run) - count
    result["regrowth"] = checkpointed(state) - full
    return result


async def bench_e2e(count: int, id_chars: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="prx-bench-") as tmp, DovecotServer() as server:
        base = await e2e_run(server, Path(tmp), count, 40)
        hostile = await e2e_run(server, Path(tmp), count, id_chars)
    for name, r in (("40-char ids", base), (f"{id_chars}-char ids", hostile)):
        print(f"[e2e] {count} strangers, {name}: state grew {mb(r['added_on_disk'])} on disk"
              f" (file + WAL), {mb(r['added'])} after a checkpoint;"
              f" {r['refused_rows']} refused rows")  # fmt: skip
    print(
        f"[e2e] ratio ({id_chars} / 40 chars, after a checkpoint):"
        f" {hostile['added'] / max(1, base['added']):.1f}x"
    )
    regrowth = mb(hostile.get("regrowth"))
    print(f"[e2e] restart with refused_retention_days=0: refused rows"
          f" {hostile.get('refused_rows_after_restart', 'n/a')};"
          f" refused mail judged again: {hostile.get('rejected_again', 'n/a')};"
          f" {count} more strangers then grow the file by {regrowth}")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--id-chars", type=int, default=8000)
    parser.add_argument("--mode", choices=["store", "e2e", "both"], default="both")
    args = parser.parse_args()
    if args.mode in ("store", "both"):
        await bench_store(args.count, args.id_chars)
    if args.mode in ("e2e", "both"):
        await bench_e2e(args.count, args.id_chars)


if __name__ == "__main__":
    asyncio.run(main())
