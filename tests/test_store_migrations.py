"""Schema migrations: a state dir from an earlier release opens and moves on."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import asdict
from pathlib import Path

import pytest

from prx_channel_email._storage import CopiesOf, Mailbox, MailKey, TokenRecord, open_storage
from prx_channel_email._storage.sqlite import store as store_mod
from prx_channel_email._storage.sqlite.store import (
    DB_NAME,
    SCHEMA_VERSION,
    Cursor,
    StateStore,
    ddl,
    migrate,
)
from prx_channel_email.models import ChannelMessage

V1 = Path(__file__).resolve().parent / "data" / "state_v1.sqlite3"  # see make_state_v1.py
ACCOUNT = "bot@example.test@127.0.0.1:993"
BOX = Mailbox(ACCOUNT, "INBOX")


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
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (42, 8)
        parent = await store.find_message(ACCOUNT, "<old-1@example.test>")
        assert parent is not None and parent.sender == "alice@example.test"
        alice = ("<old-1@example.test>", "alice@example.test")
        assert await store.handed_on(ACCOUNT, [alice]) == {alice}
        await store.set_cursor(BOX, Cursor(42, 9))
    assert applied(tmp_path / DB_NAME) == [name for name, _ in store_mod.MIGRATIONS]
    assert version(tmp_path / DB_NAME) == SCHEMA_VERSION
    # Opening again applies nothing twice.
    async with StateStore(tmp_path) as store:
        cursor = await store.get_cursor(BOX)
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


V2 = Path(__file__).resolve().parent / "data" / "state_v2.sqlite3"  # see make_state_v2.py


def key(uid: int) -> MailKey:
    return MailKey(ACCOUNT, "INBOX", 42, uid)


async def test_mail_keys_rekeys_the_state_release_58ba6be_wrote_and_keeps_every_row(
    tmp_path: Path,
) -> None:
    """The ``mail_keys`` step: ledger, in-flight and deferred rows of the release that
    keyed them by Message-ID come out keyed by (account, folder, UIDVALIDITY, UID),
    each with everything it held; a released mail's in-flight row, which had no UID,
    takes its ledger row's."""
    shutil.copy(V2, tmp_path / DB_NAME)
    async with StateStore(tmp_path) as store:
        assert "mail_keys" in await store.migrations()
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (42, 9)
        flying = await store.in_flight(BOX)
        assert [(r.key, r.message_id, r.sender) for r in flying] == [
            (key(5), "<bob-1@example.org>", "bob@example.org"),
            (key(6), "<carol-1@example.org>", "carol@example.org"),
        ]
        assert ChannelMessage.model_validate_json(flying[0].message).id == "<bob-1@example.org>"
        (waiting,) = await store.waiting(BOX)
        assert (waiting.key, waiting.message_id, waiting.seq, waiting.reason) == (
            key(9), "<carol-2@example.org>", 2, "rate_limited",
        )  # fmt: skip
        assert await store.deferred_message(key(9)) is not None
        parent = await store.find_message(ACCOUNT, "<alice-1@example.org>")
        assert parent is not None and parent.key == key(7) and parent.subject.startswith("about")
        pairs = [
            ("<alice-1@example.org>", "alice@example.org"),
            ("<bob-1@example.org>", "bob@example.org"),
            ("<carol-1@example.org>", "carol@example.org"),
            ("<carol-2@example.org>", "carol@example.org"),
            ("<eve-1@evil.test>", ""),
        ]
        assert await store.handed_on(ACCOUNT, pairs) == set(pairs[:4])  # refused never counts
        # The released mail counts once against the rate limit, at its release time.
        senders = sorted(s for s, _ in await store.recent_handoffs(ACCOUNT, 0.0))
        assert senders == ["alice@example.org", "bob@example.org", "carol@example.org"]
        # The other tables are as they were.
        held = await store.outbox(ACCOUNT).by_key("reply:abc")
        assert held is not None and held.message_id == "<reply-1@bot.example>"
        assert (await store.runtime_senders(ACCOUNT)).added == ["dave@example.org"]
        # And the re-keyed rows work: an ack settles bob's mail by its key.
        assert await store.settle(
            [CopiesOf(ACCOUNT, "<bob-1@example.org>", "bob@example.org")]
        ) == [key(5)]
        assert [r.key for r in await store.in_flight(BOX)] == [key(6)]
    assert applied(tmp_path / DB_NAME) == [name for name, _ in store_mod.MIGRATIONS]
    assert version(tmp_path / DB_NAME) == SCHEMA_VERSION


async def test_the_token_file_of_release_58ba6be_is_adopted_by_its_account(
    tmp_path: Path,
) -> None:
    """Release 58ba6be kept the OAuth grant in ``oauth-token.json`` (one per state dir):
    the account whose login it names takes it over at first use, the file goes; another
    login's file is left alone."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = TokenRecord(refresh_token="rt-1", access_token="at-1", expires_at=1.0e10,
                      lifetime=3600.0, scope="mail", provider="custom", username="bot")  # fmt: skip
    # Exactly what that release's TokenStore.save wrote.
    (state / "oauth-token.json").write_text(json.dumps(asdict(old), sort_keys=True))
    other = open_storage(state).tokens("someone@imap:993", username="someone")
    assert await other.load() is None
    assert (state / "oauth-token.json").exists()
    mine = open_storage(state).tokens("bot@imap:993", username="bot")
    assert await mine.version() is not None
    assert await mine.load() == old
    assert not (state / "oauth-token.json").exists()
    assert await other.load() is None
