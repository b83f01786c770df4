"""How an agent framework plugs the email channel in.

    python examples/agent_host.py --config config.toml   # your real account
    python examples/agent_host.py --sandbox              # the in-process demo mail server
    python examples/agent_host.py --sandbox --once       # a two-mail conversation, then exit

The host owns three things the channel does not: the queue it consumes, the
conversation memory (keyed by ``msg.thread_ts``, which stays the same for every
mail of one email thread), and the agent that turns a conversation into an
answer. Answers go back through ``msg.reply(...)`` so they land in the thread.
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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from prx_channel_email import Channel, ChannelMessage, EmailChannel, load_config


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "agent"
    text: str


class ConversationMemory:
    """Every turn of every conversation, by thread key."""

    def __init__(self) -> None:
        self._threads: dict[str, list[Turn]] = defaultdict(list)

    def add(self, thread: str, turn: Turn) -> None:
        self._threads[thread].append(turn)

    def history(self, thread: str) -> list[Turn]:
        return list(self._threads[thread])


class ToyAgent:
    """Stands in for a language model: it only shows that it remembers the thread."""

    async def respond(self, history: list[Turn]) -> str:
        said = [t.text for t in history if t.role == "user"]
        if len(said) == 1:
            return (
                f"Nice to meet you. You said: {said[0]!r}. This is message 1 of our conversation."
            )
        return (
            f"This is message {len(said)} of our talk. "
            f"You started with {said[0]!r}; now you say {said[-1]!r}."
        )


class AgentHost:
    """Consumes a channel's queue and answers each message with the agent."""

    def __init__(self, channel: Channel, agent: ToyAgent) -> None:
        self.channel = channel
        self.agent = agent
        self.memory = ConversationMemory()

    async def handle(self, msg: ChannelMessage) -> None:
        self.memory.add(msg.thread_ts, Turn("user", msg.content))
        answer = await self.agent.respond(self.memory.history(msg.thread_ts))
        # Durably queued, the reply also acknowledges msg (handoff="ack"): a crash
        # before this line hands msg on again at the next start (msg.redelivered).
        # A message the host decides not to answer: await channel.ack(msg).
        await self.channel.send(msg.reply(answer))
        self.memory.add(msg.thread_ts, Turn("agent", answer))
        print(f"[{msg.thread_ts}] {msg.sender}: {msg.content!r} -> {answer!r}", flush=True)

    async def run(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        listener = asyncio.create_task(self.channel.listen(queue))
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
                await self.handle(getter.result())
        finally:
            stopping.cancel()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _headers(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


async def conversation_on_sandbox(once: bool, stop: asyncio.Event) -> int:
    """Alice writes, reads the answer, and replies to it in the same thread."""
    from prx_channel_email.sandbox import MailSandbox

    async with MailSandbox() as sandbox:
        state = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="agent-host-"))
        async with EmailChannel(sandbox.channel_config(state)) as channel:
            host = AgentHost(channel, ToyAgent())
            task = asyncio.create_task(host.run(stop))
            if not once:
                print("sandbox running; send mail to it:", *sandbox.describe(), sep="\n  ")
                await task
                return 0
            first = _headers(await sandbox.send_as_user("Plans", "Shall we meet on Friday?"))
            reply1 = _headers(await sandbox.wait_for_mail(sandbox.user.address, within=60))
            await sandbox.send_as_user(
                "Re: Plans",
                "Saturday works better for me.",
                in_reply_to=reply1["Message-ID"],
                references=[first["Message-ID"], reply1["Message-ID"]],
            )
            raw2 = await sandbox.wait_for_mail(sandbox.user.address, count=2, within=60)
            reply2 = _headers(raw2)
            stop.set()
            await task
            body = reply2.get_body(preferencelist=("plain",))
            text = body.get_content() if body is not None else ""
            print("second answer:", text.strip())
            remembered = "message 2" in text and "Friday" in text
            print("the agent remembered the thread" if remembered else "memory FAILED")
            return 0 if remembered else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config.toml (default: $PRX_CONFIG or ./config.toml)")
    parser.add_argument("--sandbox", action="store_true", help="run on the demo mail server")
    parser.add_argument("--once", action="store_true", help="with --sandbox: one conversation")
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
            return await conversation_on_sandbox(args.once, stop)
        async with EmailChannel(load_config(args.config)) as channel:
            await AgentHost(channel, ToyAgent()).run(stop)
        return 0

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
