"""Released mail under hostile conditions, against the real Dovecot: a release is
settled like any other hand-off, and the release re-checks who is allowed."""

from __future__ import annotations

from pathlib import Path

from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import e2e_config, letter, listening

ANNA = "anna@example.org"


async def test_queue_mode_released_mail_is_not_repeated_after_a_clean_stop(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """handoff="queue": a message released from the rate limit is settled at the end of
    its release pass, so a clean stop repeats nothing (the README's promise)."""
    config = e2e_config(
        dovecot,
        account,
        tmp_path,
        allowed_senders=[ANNA],
        rate_limit_count=1,
        rate_limit_window_secs=1,
        handoff="queue",
    )
    (first, raw1), (second, raw2) = letter(ANNA), letter(ANNA)
    async with listening(config) as run:
        dovecot.deliver(account, raw1, mail_from=ANNA)
        dovecot.deliver(account, raw2, mail_from=ANNA)
        assert (await run.next()).id == first
        released = await run.next()  # a second later, from the release scheduler
        assert (released.id, released.redelivered) == (second, False)
        assert run.channel.stats()["inbound.released"] == 1
    async with listening(config) as run:  # a clean stop before: nothing comes again
        assert run.channel.stats().get("inbound.redelivered", 0) == 0
        assert run.queue.empty()
