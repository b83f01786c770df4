"""The cursor and ledger in the storage: what commit_handoff promises the sync engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prx_channel_email._handoff.ledger import LedgerWriter
from prx_channel_email._storage import Cursor, HandoffBatch, LedgerEntry, Mailbox, MailKey, Record
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.models import ChannelMessage

ACCOUNT, FOLDER = "bot@example.test@imap:993", "INBOX"
BOX = Mailbox(ACCOUNT, FOLDER)


def key(uv: int, uid: int) -> MailKey:
    return MailKey(ACCOUNT, FOLDER, uv, uid)


def entry(mid: str) -> LedgerEntry:
    return LedgerEntry(mid, "a@example.test", "a@example.test", "s", mid, [], 1.0)


async def test_commit_handoff_is_one_step_and_the_cursor_never_goes_back(tmp_path: Path) -> None:
    async with StateStore(tmp_path) as store:
        await store.commit_handoff(
            HandoffBatch(
                BOX,
                records=[
                    Record(key(7, 10), "<a@x>", "delivered", entry=entry("<a@x>")),
                    Record(key(7, 12), "<b@x>", "rejected", "not_allowed"),
                ],
                cursors=[Cursor(7, 12)],  # UID 11 (a duplicate) only moved the cursor
            )
        )
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (7, 12)
        sender = "a@example.test"
        pairs = [("<a@x>", sender), ("<b@x>", ""), ("<c@x>", sender)]
        assert await store.handed_on(ACCOUNT, pairs) == {("<a@x>", sender)}
        # Only delivered mail is a threading parent for replies.
        assert (await store.find_message(ACCOUNT, "<a@x>")) is not None
        assert (await store.find_message(ACCOUNT, "<b@x>")) is None
        await store.set_cursor(BOX, Cursor(7, 5))
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and cursor.last_uid == 12
        # A new UIDVALIDITY replaces the cursor outright.
        await store.set_cursor(BOX, Cursor(8, 3))
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and (cursor.uidvalidity, cursor.last_uid) == (8, 3)
        assert cursor.updated_at > 0


async def test_state_survives_reopening(tmp_path: Path) -> None:
    async with StateStore(tmp_path) as store:
        record = Record(key(1, 4), "<m@x>", "delivered", entry=entry("<m@x>"))
        await store.commit_handoff(HandoffBatch(BOX, records=[record], cursors=[Cursor(1, 4)]))
    async with StateStore(tmp_path) as store:
        assert await store.handed_on(ACCOUNT, [("<m@x>", "a@example.test")]) == {
            ("<m@x>", "a@example.test")
        }
        cursor = await store.get_cursor(BOX)
        assert cursor is not None and cursor.last_uid == 4


async def test_a_reply_finds_its_parent_the_moment_the_agent_has_it(tmp_path: Path) -> None:
    """An agent that answers at once must thread onto the message it got (not fall
    back to a new thread): the hand-off commits the message before the put, so the
    outbox's lookups see it while it is still in flight, before any ack or settling."""
    async with StateStore(tmp_path) as store:
        old = LedgerEntry("<old@x>", "a@example.test", "a@example.test", "old", "<old@x>", [], 1.0)
        record = Record(key(1, 1), "<old@x>", "delivered", entry=old)
        await store.commit_handoff(HandoffBatch(BOX, records=[record]))
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


def _message(i: int) -> ChannelMessage:
    return ChannelMessage(
        id=f"<m{i}@x>", sender="a@example.test", reply_target="a@example.test",
        subject="s", content="hi", full_text="hi", timestamp=2, thread_ts=f"<m{i}@x>",
    )  # fmt: skip


async def test_settled_mail_is_not_kept_in_memory_for_the_rest_of_the_run(tmp_path: Path) -> None:
    """A long run must not remember every message it handed on (a 20,000-message soak
    kept two strings per message): what the writer keeps to never put mail twice is
    only mail still in flight; once settled, copies are found in the ledger instead."""
    async with StateStore(tmp_path) as store:
        writer = LedgerWriter(store, ACCOUNT, FOLDER, Metrics(), handoff="ack")
        writer.begin(1)
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        for i in range(1, 301):
            await writer.hand_on(i, _message(i), entry(f"<m{i}@x>"), queue)
        assert writer.in_flight_count == 300
        for _ in range(299):  # the host acknowledges all but the last
            assert await writer.ledger.ack(await queue.get())
        assert writer.in_flight_count == 1
        assert writer.seen_in_pass("<m300@x>", "a@example.test")
        # A copy of settled mail is still a duplicate, by the ledger's rows.
        assert await store.handed_on(ACCOUNT, [("<m5@x>", "a@example.test")]) == {
            ("<m5@x>", "a@example.test")
        }
        # What is still in flight is not put twice by a redelivery in the same run.
        assert await writer.redeliver(queue) == 0

        quick = LedgerWriter(store, ACCOUNT, "Other", Metrics(), handoff="queue")
        quick.begin(1)
        for i in range(1, 301):
            await quick.hand_on(i, _message(1000 + i), entry(f"<m{1000 + i}@x>"), queue)
        assert quick.in_flight_count <= 1  # each put is settled by the next commit
        await quick.flush()
        assert quick.in_flight_count == 0
