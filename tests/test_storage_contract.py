"""The storage contract: what every backend of ``_storage.interface.Storage`` promises.

One suite for all backends, parametrized by the ``open_backend`` fixture: a new
backend is one more param there (a function that opens one state, fresh for the
test, as often as it is called) and must pass every test here unchanged. The tests speak only the
interface: no SQL, no connection, no file of a backend.

What is checked, per operation: keying (per mailbox, per mail, per account),
ordering, idempotency and atomicity (all of a call or none of it), and that the
OAuth token lock is exclusive (one refresh at a time).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from prx_channel_email._storage import (
    DELIVERED,
    QUARANTINED,
    REJECTED,
    RELEASE_DONE,
    RELEASE_FAILED,
    RELEASE_PENDING,
    CopiesOf,
    Cursor,
    Deferral,
    HandoffBatch,
    InFlight,
    LedgerEntry,
    Mailbox,
    MailKey,
    NewRow,
    OutboxRow,
    Record,
    Release,
    Storage,
    TokenRecord,
    open_storage,
)
from prx_channel_email.errors import OAuthUnavailable
from prx_channel_email.models import ChannelMessage, pack_message, unpack_message

A, B = "alice-bot@example.test", "bob-bot@example.test"  # two accounts
INBOX, OTHER = Mailbox(A, "INBOX"), Mailbox(A, "Other")
ALICE, MALLORY = "alice@example.org", "mallory@evil.example"


Opener = Callable[[], Awaitable[Storage]]


# A new backend: one more param and branch. "pgbouncer" is PostgreSQL through a
# transaction-pooling PgBouncer, where no session state survives a transaction.
@pytest.fixture(params=["sqlite", "postgres", "pgbouncer"])
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens this test's state (empty at first; the same state each call)."""
    if request.param == "sqlite":
        return lambda: open_storage(tmp_path / "state").open()
    if request.param == "postgres":
        # A real PostgreSQL (tests/servers/postgres.py), a fresh database per test.
        url = request.getfixturevalue("pg_url")
        return lambda: open_storage(tmp_path / "unused", url=url).open()
    if request.param == "pgbouncer":
        server = request.getfixturevalue("postgres")
        url = request.getfixturevalue("pgbouncer").url(server.new_database())
        return lambda: open_storage(tmp_path / "unused", url=url).open()
    raise AssertionError(f"no backend {request.param!r}")


@pytest.fixture
async def backend(open_backend: Opener) -> AsyncIterator[Storage]:
    store = await open_backend()
    try:
        yield store
    finally:
        await store.close()


def key(uid: int, box: Mailbox = INBOX, uv: int = 7) -> MailKey:
    return MailKey(box.account, box.folder, uv, uid)


def entry(
    mid: str, sender: str = ALICE, at: float = 1000.0, thread: str | None = None
) -> LedgerEntry:
    return LedgerEntry(mid, sender, sender, f"about {mid}", thread or mid, [], at)


def flying(k: MailKey, mid: str, sender: str = ALICE, at: float = 1000.0) -> InFlight:
    return InFlight(k, entry(mid, sender, at), f'{{"id": "{mid}", "sender": "{sender}"}}')


def deferral(k: MailKey, mid: str, seq: int, sender: str = ALICE) -> Deferral:
    return Deferral(k, entry(mid, sender), seq, "rate_limited", 1000.0 + seq,
                    f'{{"id": "{mid}", "thread_ts": "{mid}"}}')  # fmt: skip


# --- cursor ---------------------------------------------------------------------------


async def test_the_cursor_is_per_mailbox_and_never_goes_back(backend: Storage) -> None:
    assert await backend.get_cursor(INBOX) is None
    await backend.set_cursor(INBOX, Cursor(7, 10))
    await backend.set_cursor(OTHER, Cursor(3, 2))
    await backend.set_cursor(INBOX, Cursor(7, 5))  # backwards within one UIDVALIDITY: ignored
    got = await backend.get_cursor(INBOX)
    assert got is not None and (got.uidvalidity, got.last_uid) == (7, 10)
    assert got.updated_at > 0
    other = await backend.get_cursor(OTHER)
    assert other is not None and (other.uidvalidity, other.last_uid) == (3, 2)
    assert await backend.get_cursor(Mailbox(B, "INBOX")) is None
    await backend.set_cursor(INBOX, Cursor(8, 1))  # a new UIDVALIDITY replaces it
    got = await backend.get_cursor(INBOX)
    assert got is not None and (got.uidvalidity, got.last_uid) == (8, 1)


# --- the hand-off ---------------------------------------------------------------------


async def test_a_handoff_batch_is_all_or_nothing(backend: Storage) -> None:
    good = HandoffBatch(INBOX, in_flight=[flying(key(1), "<a@x>")], cursors=[Cursor(7, 1)])
    bad = HandoffBatch(
        INBOX,
        records=[Record(key(4), "<d@x>", "rejected", "not_allowed")],
        in_flight=[flying(key(2), "<b@x>")],
        deferrals=[deferral(key(3), "<c@x>", 1)],
        settle=[key(1)],
        cursors=[Cursor(7, 4), Cursor(None, 5)],  # type: ignore[arg-type]  # the last write fails
    )
    await backend.commit_handoff(good)
    with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is what stays
        await backend.commit_handoff(bad)
    assert [r.key for r in await backend.in_flight(INBOX)] == [key(1)]  # not settled either
    assert await backend.waiting(INBOX) == []
    assert await backend.handed_on(A, [("<c@x>", ALICE)]) == set()
    got = await backend.get_cursor(INBOX)
    assert got is not None and got.last_uid == 1


async def test_in_flight_rows_come_back_in_handoff_order_per_mailbox(backend: Storage) -> None:
    for uid in (5, 2, 9):  # handed on in this order (not UID order)
        await backend.commit_handoff(
            HandoffBatch(INBOX, in_flight=[flying(key(uid), f"<{uid}@x>")])
        )
    await backend.commit_handoff(HandoffBatch(OTHER, in_flight=[flying(key(1, OTHER), "<o@x>")]))
    rows = await backend.in_flight(INBOX)
    assert [r.key.uid for r in rows] == [5, 2, 9]
    assert (rows[0].message_id, rows[0].sender) == ("<5@x>", ALICE)
    assert rows[0].message == '{"id": "<5@x>", "sender": "alice@example.org"}'
    assert [r.key for r in await backend.in_flight(OTHER)] == [key(1, OTHER)]


@pytest.mark.parametrize("same", [True, False], ids=["content-is-the-text", "stripped"])
async def test_a_big_waiting_message_reads_back_whole_in_flight_and_deferred(
    backend: Storage, same: bool
) -> None:
    """A message over a megabyte is written in pieces (SQLite's blob I/O): what
    comes back, after a restart or at release, is the same message, every
    character of it, non-ASCII and quotes included."""
    text = ('élan "quoted" \u2603 ' * 60_000) + "end"
    message = ChannelMessage(
        id="<big@x>", sender=ALICE, reply_target=ALICE, subject="big", thread_ts="<big@x>",
        content=text if same else text[:1000], full_text=text, timestamp=1000.0,
    )  # fmt: skip
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[
        InFlight(key(1), entry("<big@x>"), pack_message(message))
    ], deferrals=[
        Deferral(key(2), entry("<big@x>"), 1, "rate_limited", 1000.0, pack_message(message))
    ]))  # fmt: skip
    (row,) = await backend.in_flight(INBOX)
    assert unpack_message(row.message) == message
    stored = await backend.deferred_message(key(2))
    assert stored is not None and unpack_message(stored) == message
    (waiting,) = await backend.waiting(INBOX)
    assert waiting.thread == "<big@x>"


async def test_a_mail_already_in_flight_stays_as_it_is(backend: Storage) -> None:
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[flying(key(1), "<a@x>")]))
    again = InFlight(key(1), entry("<a@x>"), '{"changed": true}')
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[again]))
    (row,) = await backend.in_flight(INBOX)
    assert row.message == '{"id": "<a@x>", "sender": "alice@example.org"}'


async def test_one_message_id_from_two_senders_is_two_mails(backend: Storage) -> None:
    shared = "<shared@x>"
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[
        flying(key(1), shared, MALLORY), flying(key(2), shared, ALICE)]))  # fmt: skip
    assert await backend.handed_on(A, [(shared, ALICE), (shared, MALLORY), (shared, "x@y")]) == {
        (shared, ALICE),
        (shared, MALLORY),
    }
    # Acking mallory's copy settles mallory's mail only.
    assert await backend.settle([CopiesOf(A, shared, MALLORY)]) == [key(1)]
    assert [(r.key, r.sender) for r in await backend.in_flight(INBOX)] == [(key(2), ALICE)]
    # Both deferred: two rows, neither swallows the other.
    await backend.commit_handoff(HandoffBatch(INBOX, deferrals=[
        deferral(key(3), shared, 1, MALLORY), deferral(key(4), shared, 2, ALICE)]))  # fmt: skip
    assert [(w.key, w.sender) for w in await backend.waiting(INBOX)] == [
        (key(3), MALLORY),
        (key(4), ALICE),
    ]


async def test_settle_moves_mail_to_the_ledger_once_and_ignores_the_unknown(
    backend: Storage,
) -> None:
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[flying(key(1), "<a@x>")]))
    assert await backend.settle([key(1), key(99)]) == [key(1)]
    assert await backend.settle([key(1)]) == []  # already settled
    assert await backend.in_flight(INBOX) == []
    # Settled: still a duplicate and a reply parent.
    assert await backend.handed_on(A, [("<a@x>", ALICE)]) == {("<a@x>", ALICE)}
    parent = await backend.find_message(A, "<a@x>")
    assert parent is not None and parent.key == key(1)
    # A batch may settle what was put before it (handoff="queue") in its own transaction.
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[flying(key(2), "<b@x>")]))
    await backend.commit_handoff(
        HandoffBatch(INBOX, in_flight=[flying(key(3), "<c@x>")], settle=[key(2)])
    )
    assert [r.key for r in await backend.in_flight(INBOX)] == [key(3)]


async def test_records_accepted_wins_over_refused_for_one_mail(backend: Storage) -> None:
    refused = Record(key(1), "<a@x>", "rejected", "not_allowed")
    accepted = Record(key(1), "<a@x>", "delivered", entry=entry("<a@x>"))
    await backend.commit_handoff(HandoffBatch(INBOX, records=[refused]))
    assert await backend.handed_on(A, [("<a@x>", ALICE)]) == set()
    assert await backend.find_message(A, "<a@x>") is None  # refused mail is no parent
    await backend.commit_handoff(HandoffBatch(INBOX, records=[accepted]))
    assert await backend.handed_on(A, [("<a@x>", ALICE)]) == {("<a@x>", ALICE)}
    await backend.commit_handoff(HandoffBatch(INBOX, records=[refused]))  # never back
    assert await backend.find_message(A, "<a@x>") is not None
    # Another sender's refused mail with the same id does not shadow it either.
    stranger = Record(key(2), "<a@x>", "rejected", "not_allowed")
    await backend.commit_handoff(HandoffBatch(INBOX, records=[stranger]))
    found = await backend.find_message(A, "<a@x>")
    assert found is not None and found.key == key(1)


async def test_duplicates_are_per_account(backend: Storage) -> None:
    await backend.commit_handoff(HandoffBatch(OTHER, in_flight=[flying(key(1, OTHER), "<a@x>")]))
    assert await backend.handed_on(B, [("<a@x>", ALICE)]) == set()
    assert await backend.handed_on(A, []) == set()
    # A true copy in another folder of the same account is a copy.
    assert await backend.handed_on(A, [("<a@x>", ALICE)]) == {("<a@x>", ALICE)}


async def test_reply_parents_newest_first_in_flight_included(backend: Storage) -> None:
    old = Record(key(1), "<old@x>", "delivered", entry=entry("<old@x>", at=1000.0))
    await backend.commit_handoff(HandoffBatch(INBOX, records=[old]))
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[InFlight(
        key(2), entry("<new@x>", at=2000.0, thread="<t@x>"), "{}")]))  # fmt: skip
    latest = await backend.latest_from(A, "Alice@Example.ORG")  # addresses fold
    assert latest is not None and latest.message_id == "<new@x>" and latest.key == key(2)
    in_thread = await backend.latest_in_thread(A, "<t@x>")
    assert in_thread is not None and in_thread.message_id == "<new@x>"
    by_id = await backend.latest_in_thread(A, "<old@x>")  # a thread is also named by its root
    assert by_id is not None and by_id.message_id == "<old@x>"
    assert await backend.latest_from(B, ALICE) is None
    assert await backend.latest_from(A, "nobody@example.org") is None


async def test_find_message_prefers_the_mail_of_the_reply_recipient(backend: Storage) -> None:
    shared = "<shared@x>"
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[
        InFlight(key(1), entry(shared, ALICE, 1000.0), "{}"),
        InFlight(key(2), entry(shared, MALLORY, 2000.0), "{}"),
    ]))  # fmt: skip
    newest = await backend.find_message(A, shared)
    assert newest is not None and newest.key == key(2)
    for_alice = await backend.find_message(A, shared, recipient="ALICE@example.org")
    assert for_alice is not None and for_alice.key == key(1)
    unknown = await backend.find_message(A, shared, recipient="carol@example.org")
    assert unknown is not None and unknown.key == key(2)  # falls back to the newest


# --- deferred mail and rate history ---------------------------------------------------


async def test_deferred_mail_waits_in_line_per_mailbox_and_goes_with_its_release(
    backend: Storage,
) -> None:
    await backend.commit_handoff(HandoffBatch(INBOX, deferrals=[
        deferral(key(3), "<c@x>", 3), deferral(key(1), "<a@x>", 1)]))  # fmt: skip
    await backend.commit_handoff(
        HandoffBatch(OTHER, deferrals=[deferral(key(1, OTHER), "<o@x>", 2)])
    )
    await backend.commit_handoff(HandoffBatch(INBOX, deferrals=[deferral(key(1), "<a@x>", 9)]))
    line = await backend.waiting(INBOX)
    assert [(w.key.uid, w.seq) for w in line] == [(1, 1), (3, 3)]  # seq order, first write kept
    assert (line[0].message_id, line[0].sender, line[0].reason, line[0].thread) == (
        "<a@x>", ALICE, "rate_limited", "<a@x>",
    )  # fmt: skip
    assert [w.key for w in await backend.waiting(OTHER)] == [key(1, OTHER)]
    assert await backend.deferred_message(key(1)) == '{"id": "<a@x>", "thread_ts": "<a@x>"}'
    # Waiting mail is accepted mail: a copy of it is a duplicate; it is no reply parent yet.
    assert await backend.handed_on(A, [("<a@x>", ALICE)]) == {("<a@x>", ALICE)}
    assert await backend.find_message(A, "<a@x>") is None
    # Released: in flight and delivered in one transaction, gone from the line.
    at = time.time()
    await backend.commit_handoff(HandoffBatch(
        INBOX, in_flight=[flying(key(1), "<a@x>")], releases=[Release(key(1), at)]))  # fmt: skip
    assert [w.key for w in await backend.waiting(INBOX)] == [key(3)]
    assert await backend.deferred_message(key(1)) is None
    assert [r.key for r in await backend.in_flight(INBOX)] == [key(1)]
    # Counted once against the rate limit, at the release time.
    assert await backend.recent_handoffs(A, at - 1) == [(ALICE, at)]


async def test_waiting_mail_refused_at_release_is_gone_and_never_counts(
    backend: Storage,
) -> None:
    await backend.commit_handoff(HandoffBatch(INBOX, deferrals=[
        deferral(key(1), "<m@x>", 1, MALLORY), deferral(key(2), "<a@x>", 2)]))  # fmt: skip
    assert await backend.refuse_waiting(key(1), "not_allowed")
    assert [w.key for w in await backend.waiting(INBOX)] == [key(2)]  # alice's still waits
    assert await backend.deferred_message(key(1)) is None
    # Refused mail is no copy of anything and no reply parent, and was never handed on.
    assert await backend.handed_on(A, [("<m@x>", MALLORY)]) == set()
    assert await backend.recent_handoffs(A, 0) == []
    assert not await backend.refuse_waiting(key(1), "not_allowed")  # once
    assert not await backend.refuse_waiting(key(9), "not_allowed")  # unknown: nothing
    # A refused row is no longer a release: a late release of it changes nothing.
    assert [w.key for w in await backend.waiting(INBOX)] == [key(2)]


async def test_quarantined_mail_is_listed_newest_first_until_handed_on(
    backend: Storage,
) -> None:
    held = LedgerEntry("<q@x>", ALICE, ALICE, "about q", "", [], 1000.0)
    await backend.commit_handoff(HandoffBatch(INBOX, records=[
        Record(key(1), "<q@x>", QUARANTINED, "reply_to_self", held),
        Record(key(2), "<r@x>", REJECTED, "not_allowed"),
        Record(key(3), "<p@x>", QUARANTINED, "parse_error")]))  # fmt: skip
    await backend.commit_handoff(HandoffBatch(OTHER, records=[
        Record(key(1, OTHER), "<o@x>", QUARANTINED, "parse_error")]))  # fmt: skip
    listed = await backend.quarantined(A)
    assert {q.key for q in listed} == {key(1), key(3), key(1, OTHER)}  # every folder
    mine = next(q for q in listed if q.key == key(1))
    assert (mine.message_id, mine.sender, mine.subject, mine.reason) == (
        "<q@x>", ALICE, "about q", "reply_to_self")  # fmt: skip
    assert await backend.quarantined(B) == []
    assert len(await backend.quarantined(A, limit=1)) == 1
    # Handed on after all (accepted wins over quarantined): no longer listed.
    await backend.commit_handoff(HandoffBatch(INBOX, in_flight=[flying(key(1), "<q@x>")]))
    await backend.settle([key(1)])
    assert key(1) not in {q.key for q in await backend.quarantined(A)}


async def test_a_release_request_is_durable_once_and_done_with_its_hand_off(
    open_backend: Opener,
) -> None:
    """The operator asks (in one process), the listener hands on (in another): the
    request survives a reopen, is recorded once, becomes done in the hand-off's own
    commit, and a failed one may be asked again."""
    backend = await open_backend()
    held = LedgerEntry("<q@x>", ALICE, ALICE, "about q", "", [], 1000.0)
    await backend.commit_handoff(HandoffBatch(INBOX, records=[
        Record(key(1), "<q@x>", QUARANTINED, "own_mail", held),
        Record(key(2), "<r@x>", REJECTED, "not_allowed"),
        Record(key(3), "<t@x>", QUARANTINED, "unverified_sender"),
        Record(key(4), "<p@x>", QUARANTINED, "parse_error")]))  # fmt: skip
    # Unknown mail and refused mail are nothing to release; nothing is recorded.
    assert await backend.request_release(key(9)) is None
    assert await backend.request_release(key(2)) is None
    assert await backend.release_request(key(2)) is None
    # A reason the caller refuses: answered, not recorded.
    refused = await backend.request_release(key(3), refuse=["unverified_sender"])
    assert refused is not None and (refused.state, refused.new) == (RELEASE_FAILED, False)
    assert await backend.release_request(key(3)) is None
    first = await backend.request_release(key(1), refuse=["unverified_sender"])
    assert first is not None and first.new and first.state == RELEASE_PENDING
    assert (first.reason, first.message_id, first.sender) == ("own_mail", "<q@x>", ALICE)
    again = await backend.request_release(key(1))
    assert again is not None and not again.new and again.state == RELEASE_PENDING
    assert (await backend.request_release(key(4))).new  # type: ignore[union-attr]
    await backend.close()
    backend = await open_backend()  # another process, or a restart
    try:
        assert [r.key for r in await backend.pending_releases(A)] == [key(1), key(4)]
        assert await backend.pending_releases(B) == []
        assert [r.key for r in await backend.pending_releases()] == [key(1), key(4)]  # all
        # It fails (gone from the server): the mail stays quarantined, may be asked again.
        await backend.fail_release(key(4), "quarantine_gone", "no longer on the server")
        failed = await backend.release_request(key(4))
        assert failed is not None and (failed.state, failed.code, failed.detail) == (
            RELEASE_FAILED, "quarantine_gone", "no longer on the server")  # fmt: skip
        assert key(4) in {q.key for q in await backend.quarantined(A)}
        retried = await backend.request_release(key(4))
        assert retried is not None and retried.new and retried.code is None
        # Handed on: the ledger row, the in-flight row and the request, one commit.
        await backend.commit_handoff(HandoffBatch(
            INBOX, records=[Record(key(1), "<q@x>", DELIVERED, None, entry("<q@x>"))],
            in_flight=[flying(key(1), "<q@x>")], releases=[Release(key(1), 2000.0)]))  # fmt: skip
        done = await backend.release_request(key(1))
        assert done is not None and done.state == RELEASE_DONE
        assert [r.key for r in await backend.pending_releases(A)] == [key(4)]
        assert key(1) not in {q.key for q in await backend.quarantined(A)}
        assert [r.key for r in await backend.in_flight(INBOX)] == [key(1)]
        # Asking again: it was released (not recorded again, still done once settled).
        await backend.settle([key(1)])
        twice = await backend.request_release(key(1))
        assert twice is not None and (twice.state, twice.new) == (RELEASE_DONE, False)
        # A failure reported late (after the hand-off) changes nothing.
        await backend.fail_release(key(1), "quarantine_gone", "late")
        assert (await backend.release_request(key(1))).state == RELEASE_DONE  # type: ignore[union-attr]
    finally:
        await backend.close()


async def test_old_refused_rows_the_cursor_passed_are_pruned_and_nothing_else(
    backend: Storage,
) -> None:
    def refused(k: MailKey, at: float) -> Record:
        return Record(k, f"<r{k.uid}@x>", REJECTED, "not_allowed",
                      entry(f"<r{k.uid}@x>", MALLORY, at))  # fmt: skip

    old, new, cut = 1000.0, 5000.0, 2000.0
    gone_uv, no_cursor = Mailbox(A, "Other"), Mailbox(A, "Unwatched")
    held = LedgerEntry("<q@x>", MALLORY, MALLORY, "about q", "", [], old)
    await backend.commit_handoff(HandoffBatch(INBOX, records=[
        refused(key(1), old), refused(key(2), old),  # passed by the cursor: pruned
        refused(key(3), old),  # above the cursor: kept
        refused(key(4), new),  # too young: kept
        Record(key(5), "<q@x>", QUARANTINED, "reply_to_self", held),
    ], in_flight=[flying(key(6), "<d@x>", at=old)], deferrals=[
        deferral(key(7), "<w@x>", 1)], cursors=[Cursor(7, 2)]))  # fmt: skip
    await backend.settle([key(6)])
    # A mailbox whose UIDVALIDITY changed since: its old UIDs mean nothing, pruned.
    await backend.commit_handoff(HandoffBatch(gone_uv, records=[
        refused(key(1, gone_uv, uv=3), old)], cursors=[Cursor(4, 9)]))  # fmt: skip
    # No cursor yet (a first start that never finished): kept.
    await backend.commit_handoff(HandoffBatch(no_cursor, records=[
        refused(key(1, no_cursor), old)]))  # fmt: skip
    theirs = Mailbox(B, "INBOX")
    await backend.commit_handoff(HandoffBatch(theirs, records=[refused(key(1, theirs), old)],
                                              cursors=[Cursor(7, 5)]))  # fmt: skip

    assert await backend.prune_refused(A, cut) == 3
    assert await backend.prune_refused(A, cut) == 0  # once
    # Quarantined, handed-on and waiting mail are untouched.
    assert [q.key for q in await backend.quarantined(A)] == [key(5)]
    found = await backend.find_message(A, "<d@x>")
    assert found is not None and found.key == key(6)
    assert [w.key for w in await backend.waiting(INBOX)] == [key(7)]
    assert await backend.handed_on(A, [("<w@x>", ALICE)]) == {("<w@x>", ALICE)}
    # Once the cursor passed it, the one above goes too; the young one waits its turn.
    await backend.set_cursor(INBOX, Cursor(7, 9))
    assert await backend.prune_refused(A, cut) == 1
    assert await backend.prune_refused(A, new + 1) == 1
    assert await backend.prune_refused(B, cut) == 1  # per account


async def test_recent_handoffs_are_per_account_oldest_first(backend: Storage) -> None:
    now = time.time()
    await backend.commit_handoff(HandoffBatch(INBOX, records=[
        Record(key(1), "<a@x>", "delivered", entry=entry("<a@x>", "x@e.org", now - 50)),
        Record(key(2), "<b@x>", "delivered", entry=entry("<b@x>", "y@e.org", now - 100)),
        Record(key(3), "<c@x>", "rejected", "not_allowed", entry("<c@x>", "z@e.org", now - 10)),
        Record(key(4), "<d@x>", "delivered", entry=entry("<d@x>", "w@e.org", now - 5000)),
    ]))  # fmt: skip
    await backend.commit_handoff(
        HandoffBatch(Mailbox(B, "INBOX"), in_flight=[flying(key(1, Mailbox(B, "INBOX")), "<e@x>")])
    )
    assert await backend.recent_handoffs(A, now - 1000) == [
        ("y@e.org", now - 100),
        ("x@e.org", now - 50),
    ]
    assert [s for s, _ in await backend.recent_handoffs(B, now - 1000)] == [ALICE]


# --- runtime senders ------------------------------------------------------------------


async def test_runtime_senders_are_differences_from_the_config_per_account(
    backend: Storage,
) -> None:
    await backend.change_sender(A, "bob@example.org", allow=True, in_config=False)
    await backend.change_sender(A, "@evil.example", allow=False, in_config=True)
    await backend.change_sender(B, "carol@example.org", allow=True, in_config=False)
    got = await backend.runtime_senders(A)
    assert (got.added, got.removed) == (["bob@example.org"], ["@evil.example"])
    await backend.change_sender(A, "@evil.example", allow=True, in_config=True)  # as configured
    got = await backend.runtime_senders(A)
    assert (got.added, got.removed) == (["bob@example.org"], [])
    assert (await backend.runtime_senders(B)).added == ["carol@example.org"]


# --- outbox ---------------------------------------------------------------------------


def new(n: int, key_: str | None = None) -> NewRow:
    return NewRow(f"<r{n}@bot>", "bot@example.test", ALICE, f"body {n}".encode(), key_)


async def test_outbox_rows_move_pending_sending_sent_per_account(backend: Storage) -> None:
    out, other = backend.outbox(A), backend.outbox(B)
    stored, until = await out.insert([new(1), new(2)], 60.0, sent=[])
    assert [s.message_id for s in stored] == ["<r1@bot>", "<r2@bot>"] and until > time.time()
    assert await out.pending() == 2 and await other.pending() == 0
    # Leased to the inserter: nobody claims them before the lease runs out.
    assert await out.claim_due([], 60.0, sent=[]) is None
    await out.release([stored[1].id])
    claimed = await out.claim_due([], 60.0, sent=[])
    assert claimed is not None and claimed[0].message_id == "<r2@bot>"
    assert claimed[0].raw == b"body 2" and claimed[0].attempts == 0
    row1 = OutboxRow(stored[0].id, "<r1@bot>", "bot@example.test", ALICE, b"body 1", 0)
    # "sent" rides on the next write (here a lease renewal) in the same transaction.
    await out.renew_lease(claimed[0].id, time.time() + 60, sent=[row1])
    states = {e.message_id: (e.state, e.attempts) for e in await out.entries()}
    assert states == {"<r1@bot>": ("sent", 1), "<r2@bot>": ("sending", 0)}
    assert [e.message_id for e in await out.entries()] == ["<r2@bot>", "<r1@bot>"]  # newest first
    assert [e.message_id for e in await out.entries(["sent"])] == ["<r1@bot>"]
    assert await other.entries() == []


async def test_outbox_idempotency_key_is_held_once_per_account(backend: Storage) -> None:
    out = backend.outbox(A)
    (first,), _ = await out.insert([new(1, "k")], 60.0, sent=[])
    (second,), _ = await out.insert([new(2, "k")], 60.0, sent=[])
    assert first.held is None and second.held is not None
    assert (second.id, second.message_id) == (first.id, "<r1@bot>")
    held = await out.by_key("k")
    assert held is not None and held.message_id == "<r1@bot>"
    (elsewhere,), _ = await backend.outbox(B).insert([new(3, "k")], 60.0, sent=[])
    assert elsewhere.held is None  # another account's key space
    assert await out.by_key("nope") is None


async def test_a_reply_of_ours_is_known_by_its_message_id_per_account(backend: Storage) -> None:
    before = time.time()
    await backend.outbox(A).insert([new(1)], 60.0, sent=[])
    found = await backend.outbox(A).sent_reply("<r1@bot>")
    assert found is not None
    at, recipient = found
    assert before - 1 <= at <= time.time() + 1 and recipient == new(1).recipient
    assert await backend.outbox(A).sent_reply("<never@bot>") is None
    assert await backend.outbox(B).sent_reply("<r1@bot>") is None  # another account's


async def test_outbox_claims_the_earliest_due_and_recovers_expired_leases(
    backend: Storage,
) -> None:
    out = backend.outbox(A)
    stored, _ = await out.insert([new(1), new(2), new(3)], 0.0, sent=[])  # leases end at once
    ids = [s.id for s in stored]
    await out.retry_later(ids[0], 1, 3600.0, "451 later", 451)
    claimed = await out.claim_due([ids[1]], 60.0, sent=[])  # excluded: not claimed
    assert claimed is not None and claimed[0].id == ids[2]
    assert 60 >= await out.next_due_in([ids[1]], 999.0) > 50  # the new lease of ids[2]
    assert await out.next_due_in(ids[1:], 999.0) > 3000  # only the retried row is left
    assert await out.next_due_in(ids, 999.0) == 999.0
    expired, pending = await out.recover()  # a start: expired leases back, waiting rows due
    assert (expired, pending) == (1, 3)
    claimed = await out.claim_due([], 60.0, sent=[])  # the earliest due first
    assert claimed is not None and claimed[0].id == ids[1]
    claimed = await out.claim_due([], 60.0, sent=[])
    assert claimed is not None and claimed[0].id == ids[0] and claimed[0].attempts == 1


async def test_outbox_failures_requeue_and_prune(backend: Storage) -> None:
    out = backend.outbox(A)
    stored, _ = await out.insert([new(1), new(2), new(3)], 60.0, sent=[])
    ids = [s.id for s in stored]
    await out.fail(ids[0], "gave up after 5 attempts: 451", code="send_failed", attempts=5,
                   smtp_code=451)  # fmt: skip
    await out.fail(ids[1], "550 no such user", code="rejected", attempts=1, smtp_code=550)
    await out.fail(ids[2], "refused login", code="auth_failed", smtp_code=None)
    entries = {e.id: e for e in await out.entries(["failed"])}
    assert (entries[ids[2]].attempts, entries[ids[1]].error_code) == (0, "rejected")
    assert await out.requeue_exhausted() == 1  # only the one whose attempts ran out
    assert await out.requeue_ids([ids[1], ids[0], 12345]) == 1  # ids[0] is not failed now
    assert await backend.outbox(B).requeue_ids([ids[2]]) == 0  # another account's row
    assert sorted(e.id for e in await out.entries(["pending"])) == sorted(ids[:2])
    # Prune: the text of rows sent before the cutoff is erased, once.
    await out.mark_sent([OutboxRow(ids[0], "<r1@bot>", "bot@example.test", ALICE, b"", 0)])
    assert await out.prune_sent(time.time() + 1) == 1
    assert await out.prune_sent(time.time() + 1) == 0
    assert await out.pending() == 1


# --- migrations -----------------------------------------------------------------------


async def test_migrations_are_named_and_applied_once(
    backend: Storage, open_backend: Opener
) -> None:
    names = await backend.migrations()
    assert names and len(set(names)) == len(names)
    assert "mail_keys" in names
    await backend.set_cursor(INBOX, Cursor(7, 3))
    await backend.close()
    reopened = await open_backend()
    try:
        got = await reopened.get_cursor(INBOX)
        assert got is not None and got.last_uid == 3  # the same state, kept
        assert await reopened.migrations() == names
    finally:
        await reopened.close()


# --- OAuth tokens ---------------------------------------------------------------------


async def test_token_records_are_per_account_versioned_and_deleted(backend: Storage) -> None:
    mine, theirs = backend.tokens(A), backend.tokens(B)
    assert await mine.load() is None and await mine.version() is None
    first = TokenRecord(refresh_token="r1", access_token="a1", expires_at=2000.0, username="u")
    await mine.save(first)
    v1 = await mine.version()
    assert v1 is not None and await mine.load() == first
    assert await theirs.load() is None
    rotated = replace(first, refresh_token="r2", access_token="a2")
    await mine.save(rotated)
    v2 = await mine.version()
    assert v2 not in (None, v1) and await mine.load() == rotated
    assert await mine.version() == v2  # unchanged while nothing is written
    assert await mine.private()
    assert await mine.delete() and not await mine.delete()
    assert await mine.load() is None and await mine.version() is None
    await mine.save(first)  # a new login after a logout never looks like the old record
    assert await mine.version() not in (None, v1, v2)


async def test_one_token_refresh_at_a_time_per_account(backend: Storage) -> None:
    mine = backend.tokens(A)
    async with mine.locked(5.0):
        with pytest.raises(OAuthUnavailable) as busy:
            async with backend.tokens(A).locked(0.2):
                pass
        assert busy.value.code == "oauth_store_busy"
        async with backend.tokens(B).locked(0.2):  # another account's grant: not held
            pass
    async with backend.tokens(A).locked(0.2):  # released on exit
        pass
