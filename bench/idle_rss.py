"""Idle RSS of a listening channel, next to a bare aioimaplib IDLE client.

Run by ``bench_inbound.py`` (one fresh process per mode), so that the figure is
the channel's alone: this file imports nothing but the package (``channel``) or
aioimaplib (``bare``), never the benchmark's servers or helpers.

    python bench/idle_rss.py channel|bare '<EmailConfig fields as JSON>'

Prints ``{"rss": <MB>, "modules": <count>}`` once the client has been in IDLE
for two seconds.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def channel(fields: dict[str, Any]) -> float:
    from prx_channel_email import ChannelMessage, EmailChannel, EmailConfig

    ch = EmailChannel(EmailConfig(**fields))
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with ch:
        task = asyncio.create_task(ch.listen(queue))
        async with asyncio.timeout(30):
            while not ch.status.idling:  # the IMAP side alone: the bench runs no SMTP server
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        rss = rss_mb()
        task.cancel()
    return rss


async def bare(fields: dict[str, Any]) -> float:
    import aioimaplib

    ctx = ssl.create_default_context(cafile=str(fields["ca_file"]))
    client = aioimaplib.IMAP4_SSL(fields["imap_host"], fields["imap_port"], ssl_context=ctx)
    await client.wait_hello_from_server()
    await client.login(fields["username"], fields["password"])
    await client.select("INBOX")
    idle = await client.idle_start(timeout=60)
    await asyncio.sleep(2.0)
    rss = rss_mb()
    client.idle_done()
    await asyncio.wait_for(idle, 10)
    await client.logout()
    return rss


def main() -> None:
    mode, fields = sys.argv[1], json.loads(sys.argv[2])
    rss = asyncio.run(channel(fields) if mode == "channel" else bare(fields))
    print(json.dumps({"rss": rss, "modules": len(sys.modules)}))


if __name__ == "__main__":
    main()
