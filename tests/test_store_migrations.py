"""Schema migrations: a state dir from an earlier release opens and moves on."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from prx_channel_email._storage.sqlite import store as store_mod
from prx_channel_email._storage.sqlite.store import (
    DB_NAME,
    SCHEMA_VERSION,
    Cursor,
    StateStore,
    ddl,
    migrate,
)

V1 = Path(__file__).resolve().parent / "data" / "state_v1.sqlite3"  # see make_state_v1.py
ACCOUNT = "bot@example.test@127.0.0.1:993"


def applied(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")]


def version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])


async def test_a_state_dir_from_the_first_release_opens_migrated_with_its_data(
    tmp_path: Path,
) -> None:
    shutil.copy(V1, tmp_path / DB_NAME)
    async with StateStore(tmp_path) as store:
        # What the old release recorded still counts: the cursor, the ledger, reply parents.
        cursor = await store.get_cursor(ACCOUNT, "INBOX")
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (42, 8)
        parent = await store.find_message(ACCOUNT, "<old-1@example.test>")
        assert parent is not None and parent.sender == "alice@example.test"
        assert await store.seen_ids(ACCOUNT, ["<old-1@example.test>"]) == {"<old-1@example.test>"}
        await store.set_cursor(ACCOUNT, "INBOX", Cursor(42, 9))
    assert applied(tmp_path / DB_NAME) == [name for name, _ in store_mod.MIGRATIONS]
    assert version(tmp_path / DB_NAME) == SCHEMA_VERSION
    # Opening again applies nothing twice.
    async with StateStore(tmp_path) as store:
        cursor = await store.get_cursor(ACCOUNT, "INBOX")
        assert cursor is not None and cursor.last_uid == 9
    assert applied(tmp_path / DB_NAME) == [name for name, _ in store_mod.MIGRATIONS]


def test_steps_run_once_in_order_and_a_failing_step_leaves_nothing_half_done(
    tmp_path: Path,
) -> None:
    conn = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    first = [("a", ddl("CREATE TABLE a (x INTEGER)")), ("b", ddl("ALTER TABLE a ADD COLUMN y"))]
    assert migrate(conn, first) == ["a", "b"]
    assert migrate(conn, first) == []
    broken = [*first, ("c", ddl("CREATE TABLE c (x); CREATE TABLE nonsense ("))]
    with pytest.raises(sqlite3.Error):
        migrate(conn, broken)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "c" not in tables  # the step's own transaction was rolled back
    assert [r[0] for r in conn.execute("SELECT name FROM schema_migrations")] == ["a", "b"]
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    conn.close()
