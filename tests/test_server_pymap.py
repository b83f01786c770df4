"""A second real IMAP server: pymap (in-process), not Dovecot.

pymap is its own implementation of IMAP4rev1 (with IDLE, MOVE, UIDPLUS,
NAMESPACE), so the channel's assumptions meet a server written by other people.
The demo's sandbox runs it with aiosmtpd in front, which delivers replies to
local users too: receive, restart and reply all go through real servers.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

from prx_channel_email._demo.sandbox import MailSandbox
from prx_channel_email.channel import EmailChannel
from prx_channel_email.models import ChannelMessage


async def _next(queue: asyncio.Queue[ChannelMessage]) -> ChannelMessage:
    return await asyncio.wait_for(queue.get(), timeout=30)


async def test_receive_restart_and_reply_on_pymap(tmp_path: Path) -> None:
    async with MailSandbox() as sandbox:
        bot, user = sandbox.bot.address, sandbox.user.address
        old = sandbox.compose(subject="Old", body="there before the first start")
        await sandbox.deliver(bot, sandbox.stamp(old, user))
        config = sandbox.channel_config(tmp_path / "state", initial_sync="new")

        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        async with EmailChannel(config) as channel:
            listener = asyncio.create_task(channel.listen(queue))
            try:
                await channel.wait_ready(30)
                sent = await sandbox.send_as_user("Lunch?", "Are you free at noon?")
                first = await _next(queue)
                asked = email.message_from_bytes(sent, policy=email.policy.default)
                assert first.id == asked["Message-ID"]  # not the mail from before
                assert first.sender_verified is True
                await channel.send(first.reply("Noon works."))
                raw = await sandbox.wait_for_mail(user, count=1)
                reply = email.message_from_bytes(raw, policy=email.policy.default)
                assert reply["In-Reply-To"] == first.id
                assert reply["Subject"] == "Re: Lunch?"
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

        later = await sandbox.send_as_user("Still on?", "While you were away")
        queue = asyncio.Queue()
        async with EmailChannel(config) as channel:
            listener = asyncio.create_task(channel.listen(queue))
            try:
                again = await _next(queue)  # nothing earlier comes again
                wanted = email.message_from_bytes(later, policy=email.policy.default)
                assert again.id == wanted["Message-ID"]
                await channel.send(again.reply("Yes."))
                raw = await sandbox.wait_for_mail(user, count=2)
                assert email.message_from_bytes(raw)["In-Reply-To"] == again.id
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
