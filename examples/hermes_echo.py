"""hermes-agent's plugin loader, config and adapter base running the ``prx_email`` platform.

    pip install "prx-channel-email[hermes]"
    python examples/hermes_echo.py --sandbox --once     # demo mail server, one round trip
    python examples/hermes_echo.py                      # $HERMES_HOME/config.yaml, echo only

A real hermes gateway with its language model needs no code at all: enable the
plugin and configure the platform in config.yaml (see examples/hermes/config.yaml),
then run ``hermes gateway``. This script does what the gateway does to bring a
platform up (load enabled plugins, read config.yaml, build the adapter, connect)
and answers with an echo instead of the agent, so it runs without a model.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

NAME = "prx_email"


async def echo(event: Any) -> str:
    """Stands in for hermes' agent: the returned text is sent anchored on the mail."""
    print(f"[{event.source.thread_id}] {event.source.user_id}: {event.text!r}", flush=True)
    return f"Echo: {event.text}"


async def connect_adapter() -> Any:
    """What ``hermes gateway`` does for one platform, from $HERMES_HOME/config.yaml."""
    from gateway.config import Platform, load_gateway_config
    from gateway.platform_registry import platform_registry
    from hermes_cli.plugins import discover_plugins

    discover_plugins()  # loads prx_email through the hermes_agent.plugins entry point
    platform_config = load_gateway_config().platforms.get(Platform(NAME))
    if platform_config is None:
        raise SystemExit(f"no platforms.{NAME} in $HERMES_HOME/config.yaml")
    adapter = platform_registry.create_adapter(NAME, platform_config)
    adapter.set_message_handler(echo)
    if not await adapter.connect():
        raise SystemExit(f"{NAME} failed: {adapter.fatal_error_message}")
    return adapter


async def round_trip_on_sandbox(once: bool) -> int:
    import yaml

    from prx_channel_email._demo.sandbox import MailSandbox

    async with MailSandbox() as sandbox:
        home = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hermes-echo-"))
        os.environ["HERMES_HOME"] = str(home)
        extra = {k: str(v) if isinstance(v, Path) else v
                 for k, v in sandbox.channel_table(home / "prx-state").items()}  # fmt: skip
        config = {
            "plugins": {"enabled": [NAME]},
            "platforms": {NAME: {"enabled": True, "extra": extra}},
        }
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        adapter = await connect_adapter()
        try:
            if not once:
                print("sandbox running; send mail to it:", *sandbox.describe(), sep="\n  ")
                await asyncio.Event().wait()
            await sandbox.send_as_user("Ping", "Is anybody there?")
            raw = await sandbox.wait_for_mail(sandbox.user.address, within=60)
        finally:
            await adapter.disconnect()
        reply = email.message_from_bytes(raw, policy=email.policy.default)
        for header in ("Subject", "In-Reply-To", "References"):
            print(f"{header}: {reply[header]}")
        body = reply.get_body(preferencelist=("plain",))
        print(body.get_content().strip() if body is not None else "")
        return 0


async def run_from_hermes_home() -> int:
    adapter = await connect_adapter()
    try:
        await asyncio.Event().wait()
    finally:
        await adapter.disconnect()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sandbox", action="store_true", help="run on the demo mail server")
    parser.add_argument("--once", action="store_true", help="with --sandbox: one round trip")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the channel does")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        if args.sandbox:
            return asyncio.run(round_trip_on_sandbox(args.once))
        return asyncio.run(run_from_hermes_home())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
