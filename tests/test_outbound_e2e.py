"""End to end: mail delivered into Dovecot, received by EmailChannel.listen, answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from prx_channel_email._mail.message_ids import parse_id_list
from prx_channel_email.channel import EmailChannel
from prx_channel_email.models import ChannelMessage, SendMessage
from tests.outbound_helpers import ANN, dovecot_config, human_mail, parse
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer


async def test_received_mail_is_answered_in_its_thread(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    config = dovecot_config(
        tmp_path,
        smtp_server,
        dovecot,
        account,
        allowed_senders=[ANN],
        initial_sync="unseen",
    )
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            dovecot.deliver(
                account,
                human_mail("<q1@people.example>", "Weekly report", "Can you send it?"),
                mail_from=ANN,
            )
            first = await asyncio.wait_for(queue.get(), timeout=30)
            assert first.id == "<q1@people.example>"
            # Answer at once, as an agent with a canned reply would.
            await channel.send(first.reply("Here it is."))
            reply1 = parse(smtp_server.messages[-1].raw)
            assert reply1["In-Reply-To"] == "<q1@people.example>"
            assert parse_id_list(reply1["References"]) == ["<q1@people.example>"]
            assert reply1["Subject"] == "Re: Weekly report"
            assert reply1["To"] == ANN

            refs = ["<q1@people.example>", reply1["Message-ID"]]
            dovecot.deliver(
                account,
                human_mail("<q2@people.example>", "Re: Weekly report", "Thanks!", refs=refs),
                mail_from=ANN,
            )
            second = await asyncio.wait_for(queue.get(), timeout=30)
            assert second.id == "<q2@people.example>"
            # A framework that knows nothing of email: only content and recipient.
            await channel.send(SendMessage(content="You're welcome.", recipient=ANN))
            reply2 = parse(smtp_server.messages[-1].raw)
            assert reply2["In-Reply-To"] == "<q2@people.example>"
            assert parse_id_list(reply2["References"]) == [*refs, "<q2@people.example>"]
            assert reply2["Subject"] == "Re: Weekly report"
            assert await channel.health_check()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    assert len(smtp_server.messages) == 2


async def test_close_while_listening_stops_the_listener_and_keeps_the_ledger(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    """A framework that closes the channel without cancelling listen() first: the
    listener ends cleanly, and what it handed on is not handed on again."""
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account, allowed_senders=[ANN], initial_sync="unseen"
    )
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    channel = EmailChannel(config)
    listener = asyncio.create_task(channel.listen(queue))
    dovecot.deliver(account, human_mail("<c1@people.example>", "One", "first"), mail_from=ANN)
    assert (await asyncio.wait_for(queue.get(), timeout=30)).id == "<c1@people.example>"
    await asyncio.wait_for(channel.close(), timeout=30)
    assert listener.done() and listener.cancelled()

    dovecot.deliver(account, human_mail("<c2@people.example>", "Two", "second"), mail_from=ANN)
    async with EmailChannel(config) as again:
        listener = asyncio.create_task(again.listen(queue))
        try:
            assert (await asyncio.wait_for(queue.get(), timeout=30)).id == "<c2@people.example>"
        finally:
            listener.cancel()
    assert queue.empty()


async def test_reply_to_a_stranger_goes_to_the_sender_and_our_reply_forwarded_back_is_ignored(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    """Issue 15: a Reply-To naming a stranger never gets the agent's answer, and our
    answer coming back rewritten (new Message-ID, no Auto-Submitted) is not handed on."""
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account, allowed_senders=[ANN], initial_sync="unseen"
    )
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            ask = human_mail("<r1@people.example>", "Secrets", "What is the plan?")
            ask = ask.replace(b"\r\nTo:", b"\r\nReply-To: eve@evil.example\r\nTo:", 1)
            dovecot.deliver(account, ask, mail_from=ANN)
            msg = await asyncio.wait_for(queue.get(), timeout=30)
            assert msg.reply_target == ANN
            await channel.send(msg.reply("The plan is ..."))
            (sent,) = smtp_server.messages
            assert sent.rcpt_tos == (ANN,)
            # Ann's mailbox auto-forwards it back, rewritten as such forwarders do.
            back = sent.raw.replace(b"Auto-Submitted:", b"X-Was-Auto-Submitted:")
            back = back.replace(b"X-Auto-Response-Suppress:", b"X-Was-Suppress:")
            back = back.replace(parse(sent.raw)["Message-ID"].encode(), b"<fw1@relay.example>")
            back = back.replace(b"From: ", b"From: Ann <" + ANN.encode() + b">\r\nX-Old-From: ", 1)
            dovecot.deliver(account, back, mail_from=ANN)
            # The next genuine mail arrives; the forwarded copy never did.
            dovecot.deliver(account, human_mail("<r2@people.example>", "Next", "ok"), mail_from=ANN)
            nxt = await asyncio.wait_for(queue.get(), timeout=30)
            assert nxt.id == "<r2@people.example>"
            await asyncio.wait_for(
                _until(lambda: channel.metrics.get("inbound.skipped.own_mail") == 1), 15
            )
            assert queue.empty()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
