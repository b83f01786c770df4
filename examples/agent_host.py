"""How an agent framework plugs the email channel in.

    python examples/agent_host.py --config config.toml   # your real account
    python examples/agent_host.py --sandbox              # the in-process demo mail server
    python examples/agent_host.py --sandbox --once       # a two-mail conversation, then exit

The host owns three things the channel does not: the queue it consumes, the
conversation memory (keyed by ``msg.thread_ts``, which stays the same for every
mail of one email thread), and the agent that turns a conversation into an
answer. Answers go back through ``msg.reply(...)`` so they land in the thread.

What a host needs from the channel beyond that, shown below:

* ``wait_ready``: start listening, then wait until IMAP and SMTP both logged in;
  a wrong password or an untrusted certificate raises at once, with its code;
* ``on_status``: be told when the channel connects, reconnects or fails;
* acknowledgement (``handoff = "ack"``, the default): a message stays "in flight"
  until the host is done with it. A reply acks it (once the reply is safely in
  the outbox); a message handled without a reply is acked with ``channel.ack``.
  If the host crashes in between, the message is handed on again at the next
  start (``msg.redelivered``), so nobody's email is lost to a crash.
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

from prx_channel_email import (
    ChannelError,
    ChannelMessage,
    ChannelStatus,
    EmailChannel,
    NotReadyError,
    load_config,
)

READY_WITHIN = 60.0  # seconds for both logins; a permanent failure raises sooner


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

    async def respond(self, history: list[Turn]) -> str | None:
        """The answer, or None when there is nothing to say."""
        said = [t.text for t in history if t.role == "user"]
        if not said[-1].strip():
            return None
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

    def __init__(self, channel: EmailChannel, agent: ToyAgent) -> None:
        self.channel = channel
        self.agent = agent
        self.memory = ConversationMemory()

    async def handle(self, msg: ChannelMessage) -> None:
        if msg.redelivered:  # handed on before a crash and never acknowledged
            print(f"[{msg.thread_ts}] (again, after a restart)", flush=True)
        self.memory.add(msg.thread_ts, Turn("user", msg.content))
        answer = await self.agent.respond(self.memory.history(msg.thread_ts))
        if answer is None:
            await self.channel.ack(msg)  # handled without a reply: say so
            return
        # Durably queued, the reply also acknowledges msg (handoff="ack"): a crash
        # before this line hands msg on again at the next start (msg.redelivered).
        await self.channel.send(msg.reply(answer))
        self.memory.add(msg.thread_ts, Turn("agent", answer))
        print(f"[{msg.thread_ts}] {msg.sender}: {msg.content!r} -> {answer!r}", flush=True)

    async def run(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        listener = asyncio.create_task(self.channel.listen(queue))
        try:
            await self.channel.wait_ready(READY_WITHIN)
        except NotReadyError as exc:  # still trying (a server down?): go on, it reconnects
            print(f"email channel not ready yet: {exc}", file=sys.stderr, flush=True)
        except ChannelError as exc:  # wrong password, untrusted certificate, no folder...
            print(f"email channel failed ({exc.code}): {exc}", file=sys.stderr, flush=True)
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            raise
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


def show_status(status: ChannelStatus) -> None:
    """What a host's dashboard would show: connected / reconnecting / failed (code)."""
    detail = f" ({status.component}: {status.code})" if status.code else ""
    print(f"channel {status.state.value}{detail}", file=sys.stderr, flush=True)


def _headers(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


async def conversation_on_sandbox(once: bool, stop: asyncio.Event) -> int:
    """Alice writes, reads the answer, and replies to it in the same thread."""
    from prx_channel_email._demo.sandbox import MailSandbox

    async with MailSandbox() as sandbox:
        state = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="agent-host-"))
        async with EmailChannel(sandbox.channel_config(state), on_status=show_status) as channel:
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
        async with EmailChannel(load_config(args.config), on_status=show_status) as channel:
            try:
                await AgentHost(channel, ToyAgent()).run(stop)
            except ChannelError:
                return 1
        return 0

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
