"""Two allowed senders, one Message-ID: two mails (issue 23, item 2), on the real Dovecot.

Every state row about a received mail is keyed by the mail (account, folder,
UIDVALIDITY, UID); the Message-ID is an attribute. So one sender reusing another's
Message-ID can neither make the other's mail vanish from the deferred line nor
settle (un-ack) it.
"""

from __future__ import annotations

from pathlib import Path

from prx_channel_email.models import ChannelMessage
from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import e2e_config, letter, listening

ALICE = "alice@example.org"
MALLORY = "mallory@evil.example"
SHARED = "<shared-id@example.org>"


def who(messages: list[ChannelMessage]) -> list[tuple[str, str]]:
    return sorted((m.id, m.sender) for m in messages)


async def test_a_deferred_mail_does_not_swallow_another_senders_mail_with_its_id(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """Both over their limit: mallory's mail with id X waits first, then alice's X.
    Both are released, each once (before: alice's was dropped at release, silently)."""
    config = e2e_config(
        dovecot, account, tmp_path, allowed_senders=[ALICE, MALLORY],
        rate_limit_count=1, rate_limit_window_secs=2,
    )  # fmt: skip
    first_m, raw_m = letter(MALLORY)
    first_a, raw_a = letter(ALICE)
    async with listening(config) as run:
        dovecot.deliver(account, raw_m, mail_from=MALLORY)
        dovecot.deliver(account, raw_a, mail_from=ALICE)
        now = [await run.next(), await run.next()]
        assert who(now) == sorted([(first_m, MALLORY), (first_a, ALICE)])
        dovecot.deliver(account, letter(MALLORY, mid=SHARED, text="mallory's")[1],
                        mail_from=MALLORY)  # fmt: skip
        dovecot.deliver(account, letter(ALICE, mid=SHARED, text="alice's")[1], mail_from=ALICE)
        stats = run.channel.stats
        await run.until(lambda: stats().get("inbound.deferred") == 2)
        later = [await run.next(), await run.next()]  # released once the window moved
        assert who(later) == sorted([(SHARED, MALLORY), (SHARED, ALICE)])
        assert sorted(m.content for m in later) == ["alice's", "mallory's"]
        assert stats()["inbound.released"] == 2
        assert run.queue.empty()


async def test_acking_one_senders_copy_leaves_the_others_in_flight(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """handoff="ack": both mails with id X are handed on; the host acks mallory's. After
    a restart alice's un-acked mail comes again (before: it had no row of its own, and
    the ack of mallory's settled "X")."""
    config = e2e_config(dovecot, account, tmp_path, allowed_senders=[ALICE, MALLORY],
                        handoff="ack")  # fmt: skip
    async with listening(config) as run:
        dovecot.deliver(account, letter(MALLORY, mid=SHARED, text="mallory's")[1],
                        mail_from=MALLORY)  # fmt: skip
        dovecot.deliver(account, letter(ALICE, mid=SHARED, text="alice's")[1], mail_from=ALICE)
        got = {m.sender: m for m in [await run.next(), await run.next()]}
        assert sorted(got) == [ALICE, MALLORY]
        await run.channel.ack(got[MALLORY])
    async with listening(config) as run:  # alice's was not acked: it comes again
        again = await run.next()
        assert (again.id, again.sender, again.content) == (SHARED, ALICE, "alice's")
        assert again.redelivered
        await run.channel.ack(again)
        assert run.queue.empty()
    async with listening(config) as run:  # both acked: nothing comes
        assert run.queue.empty()
