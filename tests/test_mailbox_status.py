"""``EmailChannel.mailboxes()``: what a status page shows of each mailbox, on real Dovecot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from prx_channel_email import ChannelError, ChannelState, EmailChannel, MailboxStatus
from prx_channel_email.config import config_from_table
from tests.integration_helpers import mail
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer
from tests.test_doctor import make_table
from tests.test_readiness import GENEROUS, listening


async def test_a_served_mailbox_is_connected_and_shows_its_last_message(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    table = make_table(dovecot, account, smtp_server, tmp_path, sender_auth="off")
    config = config_from_table(table)
    channel = EmailChannel(config)
    assert [(m.account, m.folder, m.state) for m in channel.mailboxes()] == [
        ("default", "INBOX", ChannelState.STARTING)
    ]
    queue: asyncio.Queue[object] = asyncio.Queue()
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))  # type: ignore[arg-type]
        try:
            await channel.wait_ready(GENEROUS)
            (box,) = channel.mailboxes()
            assert box.state is ChannelState.CONNECTED and box.code is None
            assert box.healthy and box.last_message_at is None
            await dovecot.adeliver(account, mail("<s1@example.test>", "hi", "hello",
                                                 sender="alice@example.test"))  # fmt: skip
            await asyncio.wait_for(queue.get(), GENEROUS)
            (box,) = channel.mailboxes()
            assert box.last_message_at is not None
            # It is plain JSON, and reads back as the same status (what /status serves).
            assert MailboxStatus.model_validate_json(box.model_dump_json()) == box
        finally:
            listener.cancel()
    assert channel.mailboxes()[0].state is ChannelState.CLOSED


async def test_a_missing_folder_shows_as_failed_with_its_code(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    table = make_table(dovecot, account, smtp_server, tmp_path, imap_folder="NoSuchFolder")
    async with listening(table) as channel:
        with pytest.raises(ChannelError):
            await channel.wait_ready(GENEROUS)
        (box,) = channel.mailboxes()
    assert (box.folder, box.state, box.code) == ("NoSuchFolder", ChannelState.FAILED,
                                                 "folder_missing")  # fmt: skip
    assert not box.healthy
