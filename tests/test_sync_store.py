"""The cursor and ledger in StateStore: what record_many promises the sync engine."""

from __future__ import annotations

from pathlib import Path

from prx_channel_email.ledger import LedgerLookup
from prx_channel_email.store import Cursor, Decided, LedgerEntry, StateStore

ACCOUNT, FOLDER = "bot@example.test@imap:993", "INBOX"


def entry(mid: str) -> LedgerEntry:
    return LedgerEntry(mid, "a@example.test", "a@example.test", "s", mid, [], 1.0)


async def test_record_many_is_one_step_and_the_cursor_never_goes_back(tmp_path: Path) -> None:
    async with StateStore(tmp_path) as store:
        await store.record_many(
            ACCOUNT,
            FOLDER,
            [
                Decided(Cursor(7, 10), "<a@x>", "delivered", uid=10, entry=entry("<a@x>")),
                Decided(Cursor(7, 11), None),  # a duplicate: cursor only
                Decided(Cursor(7, 12), "<b@x>", "rejected", "not_allowed", uid=12),
            ],
        )
        cursor = await store.get_cursor(ACCOUNT, FOLDER)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (7, 12)
        assert await store.seen_ids(ACCOUNT, ["<a@x>", "<b@x>", "<c@x>"]) == {"<a@x>", "<b@x>"}
        # Only delivered mail is a threading parent for replies.
        assert (await store.find_message(ACCOUNT, "<a@x>")) is not None
        assert (await store.find_message(ACCOUNT, "<b@x>")) is None
        await store.set_cursor(ACCOUNT, FOLDER, Cursor(7, 5))
        cursor = await store.get_cursor(ACCOUNT, FOLDER)
        assert cursor is not None and cursor.last_uid == 12
        # A new UIDVALIDITY replaces the cursor outright.
        await store.set_cursor(ACCOUNT, FOLDER, Cursor(8, 3))
        cursor = await store.get_cursor(ACCOUNT, FOLDER)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (8, 3)
        assert cursor.updated_at > 0


async def test_state_survives_reopening(tmp_path: Path) -> None:
    async with StateStore(tmp_path) as store:
        await store.record(ACCOUNT, FOLDER, Cursor(1, 4), message_id="<m@x>", outcome="delivered")
    async with StateStore(tmp_path) as store:
        assert await store.seen_ids(ACCOUNT, ["<m@x>"]) == {"<m@x>"}
        cursor = await store.get_cursor(ACCOUNT, FOLDER)
        assert cursor is not None and cursor.last_uid == 4


async def test_a_reply_finds_its_parent_before_the_ledger_row_commits(tmp_path: Path) -> None:
    """The engine puts a message on the queue before its row's group commit; an agent
    that answers at once must still thread onto it (not fall back to a new thread)."""
    async with StateStore(tmp_path) as store:
        old = LedgerEntry("<old@x>", "a@example.test", "a@example.test", "old", "<old@x>", [], 1.0)
        await store.record(ACCOUNT, FOLDER, Cursor(1, 1), message_id="<old@x>", entry=old,
                           outcome="delivered")  # fmt: skip
        new = LedgerEntry("<new@x>", "a@example.test", "a@example.test", "new", "<t@x>", [], 2.0)
        lookup = LedgerLookup(store)  # the channel's view, shared by hand-off and outbox
        lookup.stage(ACCOUNT, new)
        assert await lookup.find_message(ACCOUNT, "<new@x>") == new
        assert await lookup.latest_from(ACCOUNT, "A@example.test") == new
        assert await lookup.latest_in_thread(ACCOUNT, "<t@x>") == new
        assert await lookup.latest_in_thread(ACCOUNT, "<old@x>") == old
        # Staging is not the ledger: the message is not "seen" until its row commits.
        assert await store.seen_ids(ACCOUNT, ["<new@x>"]) == set()
        await store.record_many(
            ACCOUNT, FOLDER, [Decided(Cursor(1, 2), "<new@x>", "delivered", uid=2, entry=new)]
        )
        assert await lookup.find_message(ACCOUNT, "<new@x>") == new
        assert await lookup.latest_from(ACCOUNT, "a@example.test") == new
