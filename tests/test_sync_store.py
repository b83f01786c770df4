"""The cursor and ledger in StateStore: what record_many promises the sync engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prx_channel_email._handoff.ledger import LedgerWriter
from prx_channel_email._storage.sqlite.store import Cursor, Decided, LedgerEntry, StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.models import ChannelMessage

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


async def test_a_reply_finds_its_parent_the_moment_the_agent_has_it(tmp_path: Path) -> None:
    """An agent that answers at once must thread onto the message it got (not fall
    back to a new thread): the hand-off commits the message before the put, so the
    outbox's lookups see it while it is still in flight, before any ack or settling."""
    async with StateStore(tmp_path) as store:
        old = LedgerEntry("<old@x>", "a@example.test", "a@example.test", "old", "<old@x>", [], 1.0)
        await store.record(ACCOUNT, FOLDER, Cursor(1, 1), message_id="<old@x>", entry=old,
                           outcome="delivered")  # fmt: skip
        new = LedgerEntry("<new@x>", "a@example.test", "a@example.test", "new", "<t@x>", [], 2.0)
        message = ChannelMessage(
            id="<new@x>", sender="a@example.test", reply_target="a@example.test",
            subject="new", content="hi", full_text="hi", timestamp=2, thread_ts="<t@x>",
        )  # fmt: skip
        seen_at_put: list[LedgerEntry | None] = []

        class AgentQueue(asyncio.Queue[ChannelMessage]):
            async def put(self, item: ChannelMessage) -> None:
                # The instant the agent could have it: the outbox must already find it.
                seen_at_put.append(await store.find_message(ACCOUNT, item.id))
                await super().put(item)

        writer = LedgerWriter(store, ACCOUNT, FOLDER, Metrics(), handoff="ack")
        writer.begin(1)
        queue = AgentQueue()
        await writer.hand_on(2, message, new, queue)
        assert (await queue.get()).id == "<new@x>"  # the agent has it; nothing acked yet
        assert [e.message_id if e else None for e in seen_at_put] == ["<new@x>"]
        found = await store.latest_from(ACCOUNT, "A@example.test")
        assert found is not None and found.message_id == "<new@x>"
        in_thread = await store.latest_in_thread(ACCOUNT, "<t@x>")
        assert in_thread is not None and in_thread.message_id == "<new@x>"
        old_thread = await store.latest_in_thread(ACCOUNT, "<old@x>")
        assert old_thread is not None and old_thread.message_id == "<old@x>"
