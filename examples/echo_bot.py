"""The smallest email bot: answer every allowed email with what it said.

    python examples/echo_bot.py --config config.toml   # your real account
    python examples/echo_bot.py --sandbox              # the in-process demo mail server
    python examples/echo_bot.py --sandbox --once       # one sample mail, show the reply, exit
    prx-email run examples/echo_bot.py:handle          # the same answers, run by the CLI

The whole bot is the ``bot()`` coroutine: take messages off the queue that
``EmailChannel.listen`` fills, and send ``msg.reply(...)``, which threads the
answer under the person's email.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import logging
import signal
import sys
import tempfile
from pathlib import Path

from prx_channel_email import ChannelMessage, EmailChannel, EmailConfig, load_config


def answer(msg: ChannelMessage) -> str:
    return f"Hello {msg.sender_display or msg.sender}, you wrote:\n\n{msg.content}"


async def handle(msg: ChannelMessage) -> str:
    """The same bot as a handler for the CLI: prx-email run examples/echo_bot.py:handle"""
    return answer(msg)


async def bot(channel: EmailChannel, stop: asyncio.Event) -> None:
    """Answer messages until ``stop`` is set."""
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    listener = asyncio.create_task(channel.listen(queue))
    stopping = asyncio.create_task(stop.wait())
    try:
        while True:
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait(
                {getter, stopping, listener}, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                break
            msg = getter.result()
            print(f"<- {msg.sender}: {msg.subject!r}", flush=True)
            await channel.send(msg.reply(answer(msg)))
            print(f"-> replied to {msg.reply_target}", flush=True)
    finally:
        stopping.cancel()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


async def run(config: EmailConfig, stop: asyncio.Event) -> None:
    async with EmailChannel(config) as channel:
        await bot(channel, stop)


async def run_on_sandbox(once: bool, stop: asyncio.Event) -> int:
    from prx_channel_email._demo.sandbox import MailSandbox

    async with MailSandbox() as sandbox:
        state = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="echo-bot-"))
        config = sandbox.channel_config(state)
        async with EmailChannel(config) as channel:
            task = asyncio.create_task(bot(channel, stop))
            if once:
                await sandbox.send_as_user("Ping", "Is anybody there?")
                raw = await sandbox.wait_for_mail(sandbox.user.address, within=60)
                reply = email.message_from_bytes(raw, policy=email.policy.default)
                body = reply.get_body(preferencelist=("plain",))
                print(f"Subject: {reply['Subject']}\nIn-Reply-To: {reply['In-Reply-To']}\n")
                print(body.get_content() if body is not None else "")
                stop.set()
            else:
                print("sandbox running; send mail to it:", *sandbox.describe(), sep="\n  ")
            await task
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config.toml (default: $PRX_CONFIG or ./config.toml)")
    parser.add_argument("--sandbox", action="store_true", help="run on the demo mail server")
    parser.add_argument("--once", action="store_true", help="with --sandbox: one round trip")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the channel does")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # the sandbox SMTP server's chatter

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.sandbox:
            return await run_on_sandbox(args.once, stop)
        await run(load_config(args.config), stop)
        return 0

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
