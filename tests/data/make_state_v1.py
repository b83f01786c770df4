"""Writes tests/data/state_v1.sqlite3: a state file exactly as release 73ffd4c wrote it.

Run once from the repository root (``python tests/data/make_state_v1.py``); the
output is checked in, so the migration test opens what an installed release left
on disk, not what today's code believes it left. It loads that release's
``store.py`` from git, so re-running it gives the same schema.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import types
from pathlib import Path

RELEASE = "73ffd4c"
HERE = Path(__file__).resolve().parent
ACCOUNT = "bot@example.test@127.0.0.1:993"


def release_store() -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{RELEASE}:prx_channel_email/store.py"],
        cwd=HERE, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader("release_store", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_store"] = module
    exec(compile(source, "release_store.py", "exec"), module.__dict__)
    return module


async def main() -> None:
    store_mod = release_store()
    with tempfile.TemporaryDirectory() as tmp:
        async with store_mod.StateStore(Path(tmp)) as store:
            entry = store_mod.LedgerEntry(
                "<old-1@example.test>", "alice@example.test", "alice@example.test",
                "hello", "<old-1@example.test>", [], 1_700_000_000.0,
            )  # fmt: skip
            await store.record(ACCOUNT, "INBOX", store_mod.Cursor(42, 7),
                               message_id=entry.message_id, outcome="delivered", uid=7,
                               entry=entry)  # fmt: skip
            await store.record(ACCOUNT, "INBOX", store_mod.Cursor(42, 8),
                               message_id="<eve-1@evil.test>", outcome="rejected",
                               reason="not_allowed", uid=8)  # fmt: skip
        conn = sqlite3.connect(Path(tmp) / store_mod.DB_NAME)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        conn.close()
        shutil.copy(Path(tmp) / store_mod.DB_NAME, HERE / "state_v1.sqlite3")


if __name__ == "__main__":
    asyncio.run(main())
