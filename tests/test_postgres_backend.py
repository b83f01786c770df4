"""What the PostgreSQL backend adds to the storage contract: fenced writes, outbox rows
shared by replicas, and a password that never shows.

The contract itself (tests/test_storage_contract.py) runs on this backend too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._inbound.sync import SyncEngine
from prx_channel_email._storage import (
    Cursor,
    Deferral,
    HandoffBatch,
    InFlight,
    LeaseLost,
    LedgerEntry,
    Mailbox,
    MailKey,
    NewRow,
    open_storage,
)
from prx_channel_email._storage.postgres.leases import LeaseTable
from prx_channel_email._storage.postgres.store import PostgresStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.errors import StorageError
from tests.config_builder import build_config
from tests.servers.postgres import PASSWORD, PostgresServer
from tests.test_leases import _until

BOX = Mailbox("support", "INBOX")


@pytest.fixture
async def two(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two replicas' stores on one database."""
    a = await open_storage(tmp_path, url=pg_url).open()
    b = await open_storage(tmp_path, url=pg_url).open()
    assert isinstance(a, PostgresStore) and isinstance(b, PostgresStore)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _mail(uid: int) -> InFlight:
    key = MailKey(BOX.account, BOX.folder, 7, uid)
    entry = LedgerEntry(f"<m{uid}@x>", "alice@example.org", "alice@example.org", "hi",
                        f"<m{uid}@x>", [], 1000.0 + uid, key)  # fmt: skip
    return InFlight(key, entry, "{}")


async def test_a_fenced_handoff_commits_under_the_lease_and_is_refused_after_a_takeover(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    leases_a = LeaseTable(a.pool, lease_secs=0.5)
    (held,) = await leases_a.acquire("A", [(BOX.account, BOX.folder)], limit=1)
    await a.commit_handoff(HandoffBatch(BOX, in_flight=[_mail(1)], cursors=[Cursor(7, 1)],
                                        fence=held.epoch))  # fmt: skip
    # B takes the mailbox over once A's lease ran out (A froze).
    leases_b = LeaseTable(b.pool, lease_secs=30)
    await _until(lambda: leases_b.acquire("B", [(BOX.account, BOX.folder)], limit=1))
    with pytest.raises(LeaseLost) as refused:
        await a.commit_handoff(HandoffBatch(BOX, in_flight=[_mail(2)], cursors=[Cursor(7, 2)],
                                            fence=held.epoch))  # fmt: skip
    assert refused.value.code == "lease_lost"
    with pytest.raises(LeaseLost):
        await a.set_cursor(BOX, Cursor(7, 9), fence=held.epoch)
    # Nothing of the refused writes is there: B sees A's first mail only, cursor at 1.
    assert [row.key.uid for row in await b.in_flight(BOX)] == [1]
    cursor = await b.get_cursor(BOX)
    assert cursor is not None and cursor.last_uid == 1


async def test_a_queued_reply_is_sent_by_one_replica_and_taken_over_when_it_dies(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    row = NewRow("<r1@bot>", "bot@example.test", "alice@example.org", b"raw", "key-1")
    (stored,), _ = await a.outbox("support").insert([row], lease_secs=0.5, sent=[])
    # A holds the row (it is sending it): B finds nothing to claim while the lease runs.
    assert await b.outbox("support").claim_due([], 30, sent=[]) is None
    # A dies mid-send: its lease runs out and B claims the same row (same Message-ID).
    claimed = await _until(lambda: b.outbox("support").claim_due([], 30, sent=[]))
    assert claimed[0].id == stored.id and claimed[0].message_id == "<r1@bot>"
    # Now B holds it: A, back from the dead, cannot claim it again.
    assert await a.outbox("support").claim_due([], 30, sent=[]) is None
    # A second send with the same key from either replica is the same row.
    (again,), _ = await a.outbox("support").insert([row], lease_secs=30, sent=[])
    assert again.id == stored.id and again.held is not None


async def test_concurrent_claims_never_hand_one_row_to_two_replicas(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    rows = [NewRow(f"<r{i}@bot>", "bot@example.test", "x@example.org", b"r") for i in range(20)]
    for r in rows:
        await a.outbox("support").insert([r], lease_secs=0.0, sent=[])
    await a.outbox("support").release([])  # nothing held: every row is due (lease 0)

    async def drain(store: PostgresStore) -> list[int]:
        got: list[int] = []
        while (c := await store.outbox("support").claim_due(got, 60, sent=[])) is not None:
            got.append(c[0].id)
        return got

    got_a, got_b = await asyncio.gather(drain(a), drain(b))
    assert not set(got_a) & set(got_b), "a row was claimed by both replicas"
    assert len(got_a) + len(got_b) == 20


async def test_the_password_in_state_url_never_shows_in_an_error(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    wrong_port = postgres.url("nope", port=1)
    store = open_storage(tmp_path, url=wrong_port)
    assert PASSWORD not in store.location and "***" in store.location
    with pytest.raises(StorageError) as err:
        await store.open()
    assert err.value.code == "storage_unavailable"
    assert PASSWORD not in str(err.value) and PASSWORD not in repr(err.value.args)
    bad_password = postgres.url(postgres.new_database()).replace(PASSWORD, "not-it-" + PASSWORD)
    with pytest.raises(StorageError) as err2:
        await open_storage(tmp_path, url=bad_password).open()
    assert PASSWORD not in str(err2.value)


async def test_replicas_starting_together_apply_each_migration_once(
    pg_url: str, tmp_path: Path
) -> None:
    stores = [open_storage(tmp_path, url=pg_url) for _ in range(4)]
    opened = await asyncio.gather(*(s.open() for s in stores))
    try:
        names = await opened[0].migrations()
        assert len(names) == len(set(names)) and names[0] == "base" and "leases" in names
        assert all([await s.migrations() == names for s in opened])
    finally:
        for s in opened:
            await s.close()


async def test_with_state_url_the_oauth_grant_is_shared_and_refreshed_one_at_a_time(
    pg_url: str, tmp_path: Path
) -> None:
    from prx_channel_email._oauth.tokens import token_store
    from prx_channel_email._storage import TokenRecord
    from prx_channel_email.errors import OAuthUnavailable
    from tests.config_builder import build_config

    def config(where: str) -> Any:
        return build_config(tmp_path / where, username="bot@example.test", password="x",
                            from_address="bot@example.test", state_url=pg_url)  # fmt: skip

    # Two replicas (other state_dirs, one database) see one record ...
    one, two = token_store(config("a")), token_store(config("b"))
    await one.save(TokenRecord(refresh_token="r1", access_token="a1", expires_at=1e10))
    loaded = await two.load()
    assert loaded is not None and loaded.refresh_token == "r1"
    # ... and only one of them may refresh it at a time.
    async with one.locked(within=5):
        with pytest.raises(OAuthUnavailable) as busy:
            async with two.locked(within=0.5):
                pass
        assert busy.value.code == "oauth_store_busy"
    async with two.locked(within=5):
        pass


async def test_a_replica_that_lost_the_mailbox_cannot_refuse_its_waiting_mail(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    """Refusing waiting mail (its sender was removed) is a write for the mailbox like
    any other: under a lost lease it is refused and the mail still waits for the holder."""
    a, b = two
    leases_a = LeaseTable(a.pool, lease_secs=0.5)
    (held,) = await leases_a.acquire("A", [(BOX.account, BOX.folder)], limit=1)
    waiting = _mail(1)
    await a.commit_handoff(HandoffBatch(BOX, deferrals=[
        Deferral(waiting.key, waiting.entry, 1, "rate_limited", 1000.0, "{}")],
        cursors=[Cursor(7, 1)], fence=held.epoch))  # fmt: skip
    leases_b = LeaseTable(b.pool, lease_secs=30)
    await _until(lambda: leases_b.acquire("B", [(BOX.account, BOX.folder)], limit=1))
    with pytest.raises(LeaseLost):
        await a.refuse_waiting(waiting.key, "not_allowed", fence=held.epoch)
    assert [w.key for w in await b.waiting(BOX)] == [waiting.key]  # B decides it
    assert await b.handed_on(BOX.account, [("<m1@x>", "alice@example.org")])


async def test_the_release_scheduler_of_a_replica_that_lost_the_mailbox_refuses_nothing(
    two: tuple[PostgresStore, PostgresStore], tmp_path: Path
) -> None:
    """The sync engine's release scheduler writes its refusals under the mailbox's
    lease (the fence the engine serves under), as the hand-off does."""
    a, b = two
    cfg = build_config(tmp_path, username="bot", password="pw", from_address="bot@example.test",
                       allowed_senders=["x@y.example"])  # fmt: skip
    box = Mailbox(cfg.account, cfg.imap_folder)
    leases_a = LeaseTable(a.pool, lease_secs=0.5)
    (held,) = await leases_a.acquire("A", [(box.account, box.folder)], limit=1)
    key = MailKey(box.account, box.folder, 7, 1)
    mallory = LedgerEntry("<m1@x>", "mallory@evil.example", "mallory@evil.example", "hi",
                          "<m1@x>", [], 1000.0, key)  # fmt: skip
    await a.commit_handoff(HandoffBatch(box, deferrals=[
        Deferral(key, mallory, 1, "rate_limited", 1000.0, "{}")], fence=held.epoch))  # fmt: skip
    leases_b = LeaseTable(b.pool, lease_secs=30)
    await _until(lambda: leases_b.acquire("B", [(box.account, box.folder)], limit=1))
    metrics = Metrics()
    engine = SyncEngine(cfg, a, InboundPipeline(cfg, metrics=metrics), metrics)
    engine.serve_under(held.epoch)  # A still believes it holds the mailbox

    async def refused_write() -> bool:
        return metrics.get("inbound.errors") >= 1  # the release pass failed: LeaseLost

    task = asyncio.create_task(engine.deferred.run(_no_hand_on))
    try:
        await _until(refused_write)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert metrics.get("inbound.refused_at_release") == 0
    assert [w.key for w in await b.waiting(box)] == [key]  # still B's to decide


async def _no_hand_on(message: object, release: object) -> None:
    raise AssertionError("nothing is released here")
