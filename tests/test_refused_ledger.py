"""The records of refused mail (issue 23, item 10): pruned after
``refused_retention_days`` by a running channel, without that mail ever coming back,
and a stranger's absurd Message-ID is not stored whole (real Dovecot; the storage
checks on SQLite and real PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from prx_channel_email._outbound import outbox as outbox_mod
from prx_channel_email._storage import (
    REFUSED_ID_CHARS,
    REJECTED,
    Cursor,
    Deferral,
    HandoffBatch,
    LedgerEntry,
    Mailbox,
    MailKey,
    Record,
    Storage,
    open_storage,
)
from prx_channel_email._storage.postgres.store import PostgresStore
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore
from tests.fakes.pipeline import mail, mid
from tests.servers.dovecot import Account, DovecotServer
from tests.test_host_senders import ALICE, EVE, config, listening

LONG_ID = "<" + "x" * 8000 + "@evil.example>"  # the 8 KB ids


def _refused_rows(state: Path) -> list[tuple[str, str]]:
    """(Message-ID, outcome) of every ledger row that is not handed-on mail (read-only)."""
    with sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT message_id, outcome FROM ledger WHERE outcome IN ('rejected', 'quarantined')"
        ).fetchall()


async def _until_rows(state: Path, wanted: list[tuple[str, str]], within: float = 15.0) -> None:
    """Wait (bounded) until the non-handed-on rows are exactly ``wanted``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (rows := _refused_rows(state)) != wanted:
        assert loop.time() < deadline, f"the rows stayed {rows}"
        await asyncio.sleep(0.05)


async def test_a_running_channel_prunes_old_refused_rows_and_that_mail_never_comes_back(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prx_channel_email.sync")
    # A retention of about a second, and the hourly housekeeping every 0.2 s.
    monkeypatch.setattr(outbox_mod, "PRUNE_EVERY_SECS", 0.2)
    cfg = config(dovecot, account, tmp_path, allowed_senders=[ALICE],
                 refused_retention_days=1 / 86400)  # fmt: skip
    state = tmp_path / "state"
    async with listening(cfg) as run:
        strangers = [mail(1, sender=EVE), mail(2, sender=EVE),
                     mail(3, sender=EVE).replace(mid(3).encode(), LONG_ID.encode())]  # fmt: skip
        for raw in strangers:
            await dovecot.adeliver(account, raw)
        # Alice's mail with our address as Reply-To: quarantined (kept for the operator).
        held = mail(4, sender=ALICE).replace(
            b"Subject:", f"Reply-To: {account.address}\r\nSubject:".encode(), 1
        )
        await dovecot.adeliver(account, held)
        await dovecot.adeliver(account, mail(5, sender=ALICE))
        assert (await run.next()).id == mid(5)
        refused = {(await run.next_rejected()).id for _ in strangers}
        assert refused == {mid(1), mid(2), LONG_ID}
        # The refused rows go; the quarantined mail's stays (UIDs need not follow the
        # delivery order: this also waits for its decision).
        await _until_rows(state, [(mid(4), "quarantined")])
    pruned = [r for r in caplog.records if "ledger.pruned_refused" in r.getMessage()]
    assert pruned and "pruned=" in pruned[0].getMessage()

    # A restart: the refused mail is still on the server, unread, and stays refused
    # without being judged again (on_rejected is not called, nothing is handed on).
    async with listening(cfg) as run:
        assert [q.message_id for q in await run.channel.quarantined()] == [mid(4)]
        await dovecot.adeliver(account, mail(6, sender=ALICE))
        assert (await run.next()).id == mid(6)
        assert run.queue.empty() and run.rejected.empty()
        assert run.channel.metrics.get("inbound.skipped.not_allowed") == 0


# --- the storage, on both backends ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "sqlite":
        store: Storage = await open_storage(tmp_path / "state").open()
    else:
        pytest.importorskip("psycopg")
        url = request.getfixturevalue("pg_url")
        store = await open_storage(tmp_path / "unused", url=url).open()
    try:
        yield store
    finally:
        await store.close()


async def _stored_ids(store: Storage) -> dict[int, str]:
    """uid -> the Message-ID its ledger row holds (the backend's own SQL: what is on disk)."""
    sql = "SELECT uid, message_id FROM ledger"
    if isinstance(store, StateStore):
        rows = await store.run(lambda conn: conn.execute(sql).fetchall())
    else:
        assert isinstance(store, PostgresStore)

        async def q(cur: object) -> list[tuple[int, str]]:
            await cur.execute(sql)  # type: ignore[attr-defined]
            return list(await cur.fetchall())  # type: ignore[attr-defined]

        rows = await store.run(q)
    return {int(uid): m for uid, m in rows}


async def test_a_refused_mails_message_id_is_stored_cut_and_handed_on_mail_keeps_its_own(
    backend: Storage,
) -> None:
    box = Mailbox("bot@example.test", "INBOX")

    def k(uid: int) -> MailKey:
        return MailKey(box.account, box.folder, 7, uid)

    long_ok = "<" + "a" * 600 + "@example.org>"  # odd, but an allowed sender's: kept whole
    entry = LedgerEntry(long_ok, ALICE, ALICE, "hi", long_ok, [], 1000.0)
    waiting = Deferral(k(3), replace_id(entry, LONG_ID), 1, "rate_limited", 1000.0,
                       '{"thread_ts": ""}')  # fmt: skip
    await backend.commit_handoff(HandoffBatch(box, records=[
        Record(k(1), LONG_ID, REJECTED, "not_allowed"),
        Record(k(2), long_ok, "delivered", entry=entry),
    ], deferrals=[waiting], cursors=[Cursor(7, 3)]))  # fmt: skip
    # Waiting mail refused at release (its sender was removed) is cut the same way.
    assert await backend.refuse_waiting(k(3), "not_allowed")
    stored = await _stored_ids(backend)
    assert stored == {1: LONG_ID[:REFUSED_ID_CHARS], 2: long_ok, 3: LONG_ID[:REFUSED_ID_CHARS]}
    found = await backend.find_message(box.account, long_ok)
    assert found is not None and found.key == k(2)


def replace_id(entry: LedgerEntry, message_id: str) -> LedgerEntry:
    return LedgerEntry(message_id, entry.sender, entry.reply_target, entry.subject,
                       entry.thread_ts, entry.references, entry.received_at)  # fmt: skip
