"""Writes tests/data/state_v2.sqlite3: a state file exactly as release 58ba6be wrote it.

That release keyed received mail by (account, Message-ID); the ``mail_keys``
migration re-keys it by the mail (account, folder, UIDVALIDITY, UID). Run once
from the repository root (``python tests/data/make_state_v2.py``); the output is
checked in, so the migration test opens what an installed release left on disk.
The release's whole package is taken from git (``git archive``) and run in a child
process, so re-running it gives the same rows.

What it holds, one of each kind of row that release wrote:

* the cursor of INBOX (UIDVALIDITY 42, last UID 9);
* a settled ledger row (alice, UID 7) and a refused one (eve, UID 8);
* a mail in flight (bob, UID 5) and a deferred mail released and still in flight
  (carol's ``<carol-1>``, UID 6: its in-flight row has no UID, only its ledger row does);
* a deferred mail waiting (carol's ``<carol-2>``, UID 9);
* an outbox row, and a runtime sender.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

RELEASE = "58ba6be"
HERE = Path(__file__).resolve().parent
ACCOUNT = "bot@example.test@127.0.0.1:993"
T0 = 1_700_000_000.0


async def write(state: Path) -> None:
    """Runs in the child, on the release's code."""
    from prx_channel_email._inbound.ratelimit import Waiting
    from prx_channel_email._storage.sqlite import deferred_table, senders_table
    from prx_channel_email._storage.sqlite.outbox_table import NewRow, OutboxTable
    from prx_channel_email._storage.sqlite.store import Cursor, Decided, LedgerEntry, StateStore
    from prx_channel_email.models import ChannelMessage

    def entry(mid: str, sender: str, at: float) -> LedgerEntry:
        return LedgerEntry(mid, sender, sender, f"about {mid}", mid, [], at)

    def message(mid: str, sender: str, at: float) -> ChannelMessage:
        return ChannelMessage(id=mid, sender=sender, reply_target=sender, subject=f"about {mid}",
                              content="hi", full_text="hi", timestamp=int(at),
                              thread_ts=mid)  # fmt: skip

    async with StateStore(state) as store:
        alice, bob, eve = "<alice-1@example.org>", "<bob-1@example.org>", "<eve-1@evil.test>"
        carol1, carol2 = "<carol-1@example.org>", "<carol-2@example.org>"
        await store.record_many(ACCOUNT, "INBOX", [
            Decided(Cursor(42, 5), bob, "in_flight", uid=5,
                    entry=entry(bob, "bob@example.org", T0 + 5),
                    message=message(bob, "bob@example.org", T0 + 5).model_dump_json()),
            Decided(Cursor(42, 6), carol1, "deferred", "rate_limited", uid=6,
                    entry=entry(carol1, "carol@example.org", T0 + 6),
                    also=lambda conn: deferred_table.insert(
                        conn, ACCOUNT, Waiting(1, carol1, "carol@example.org", T0 + 6),
                        message(carol1, "carol@example.org", T0 + 6))),
            Decided(Cursor(42, 7), alice, "in_flight", uid=7,
                    entry=entry(alice, "alice@example.org", T0 + 7),
                    message=message(alice, "alice@example.org", T0 + 7).model_dump_json()),
            Decided(Cursor(42, 8), eve, "rejected", "not_allowed", uid=8),
            Decided(Cursor(42, 9), carol2, "deferred", "rate_limited", uid=9,
                    entry=entry(carol2, "carol@example.org", T0 + 9),
                    also=lambda conn: deferred_table.insert(
                        conn, ACCOUNT, Waiting(2, carol2, "carol@example.org", T0 + 9),
                        message(carol2, "carol@example.org", T0 + 9))),
        ])  # fmt: skip
        await store.settle(ACCOUNT, [alice])
        # The release of carol-1: in flight without a UID, its ledger row delivered.
        released = Decided(None, carol1, "in_flight",
                           entry=entry(carol1, "carol@example.org", T0 + 6),
                           message=message(carol1, "carol@example.org", T0 + 6).model_dump_json(),
                           also=lambda conn: deferred_table.mark_handed_on(
                               conn, ACCOUNT, carol1, T0 + 60))  # fmt: skip
        await store.record_many(ACCOUNT, "INBOX", [released], move_cursor=False)
        table = OutboxTable(store, ACCOUNT)
        await table.insert([NewRow("<reply-1@bot.example>", "bot@example.test",
                                   "alice@example.org", b"Subject: re\r\n\r\nhi\r\n",
                                   "reply:abc")], 60.0, sent=[])  # fmt: skip
        await store.run(lambda conn: senders_table.change(
            conn, ACCOUNT, "dave@example.org", allow=True, in_config=False))  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        archive = subprocess.run(
            ["git", "archive", RELEASE, "prx_channel_email"],
            cwd=HERE.parent.parent, check=True, capture_output=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        shutil.copy(__file__, code / "make_state_v2.py")
        state = Path(tmp) / "state"
        subprocess.run(
            [sys.executable, str(code / "make_state_v2.py"), "--write", str(state)],
            cwd=code, env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"}, check=True,
        )  # fmt: skip
        conn = sqlite3.connect(state / "state.sqlite3")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        conn.close()
        shutil.copy(state / "state.sqlite3", HERE / "state_v2.sqlite3")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        asyncio.run(write(Path(sys.argv[2])))
    else:
        main()
