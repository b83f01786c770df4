"""nanobot's own MessageBus and ChannelManager running the ``prx_email`` channel.

    pip install "prx-channel-email[nanobot]"
    python examples/nanobot_echo.py --sandbox --once          # demo mail server, one round trip
    python examples/nanobot_echo.py --config ~/.nanobot/config.json   # your account, echo only

A real nanobot with its language model needs no code at all: put the channel table
in nanobot's config.json (see examples/nanobot/config.json) and run
``python -m prx_channel_email.integrations.nanobot gateway``. This script swaps
nanobot's agent loop for an echo so that it runs without a model: it consumes the
bus's inbound queue and publishes replies the way the agent loop does (same
channel and chat, the inbound metadata copied, so each reply lands in its thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from prx_channel_email.integrations.nanobot import NAME, register


async def echo_agent(bus: Any) -> None:
    from nanobot.bus.events import OutboundMessage

    while True:
        msg = await bus.consume_inbound()
        print(f"[{msg.session_key}] {msg.sender_id}: {msg.content!r}", flush=True)
        await bus.publish_outbound(
            OutboundMessage(
                channel=msg.channel,
                chat_id=msg.chat_id,
                content=f"Echo: {msg.content}",
                metadata=dict(msg.metadata),
            )
        )


async def serve(config: Any, config_path: Path, stop: asyncio.Event) -> None:
    """Run nanobot's ChannelManager with the echo agent until ``stop`` is set."""
    from nanobot.bus.queue import MessageBus
    from nanobot.channels.manager import ChannelManager

    register()  # nanobot 0.3.5 lists only its own packages' channels
    bus = MessageBus()
    manager = ChannelManager(config, bus, config_path=config_path)
    agent = asyncio.create_task(echo_agent(bus))
    started = asyncio.create_task(manager.start_all())
    try:
        await stop.wait()
    finally:
        await manager.stop_all()
        await started
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent
        state = manager.get_status().get(NAME, {})
        if state.get("error"):
            print(f"{NAME} failed: {state['error']}", file=sys.stderr)


async def round_trip_on_sandbox(once: bool) -> int:
    from nanobot.config.schema import Config

    from prx_channel_email._demo.sandbox import MailSandbox

    async with MailSandbox() as sandbox:
        state = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="nanobot-echo-"))
        section = {"enabled": True, **sandbox.channel_table(state)}
        config = Config.model_validate(
            {"channels": {NAME: section, "websocket": {"enabled": False}}}
        )
        stop = asyncio.Event()
        server = asyncio.create_task(serve(config, state / "config.json", stop))
        if not once:
            print("sandbox running; send mail to it:", *sandbox.describe(), sep="\n  ")
            await server
            return 0
        await sandbox.send_as_user("Ping", "Is anybody there?")
        raw = await sandbox.wait_for_mail(sandbox.user.address, within=60)
        stop.set()
        await server
        reply = email.message_from_bytes(raw, policy=email.policy.default)
        for header in ("Subject", "In-Reply-To", "References"):
            print(f"{header}: {reply[header]}")
        body = reply.get_body(preferencelist=("plain",))
        print(body.get_content().strip() if body is not None else "")
        return 0


async def run_with_config(path: Path) -> int:
    from nanobot.config.loader import load_config

    await serve(load_config(path), path, asyncio.Event())  # until Ctrl-C
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", type=Path, help="nanobot's config.json with channels.prx_email")
    parser.add_argument("--sandbox", action="store_true", help="run on the demo mail server")
    parser.add_argument("--once", action="store_true", help="with --sandbox: one round trip")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the channel does")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if args.sandbox:
        return asyncio.run(round_trip_on_sandbox(args.once))
    if args.config is None:
        parser.error("give --config PATH (nanobot's config.json) or --sandbox")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_with_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
