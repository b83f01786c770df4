"""Child process for the acknowledged hand-off test: a host that acks some messages
and replies to others, while the parent SIGKILLs it at random points.

Usage: ``python -m tests.fakes.host_child CONFIG_JSON MODE``. Every line is flushed
the moment it is true: ``GOT <id> <redelivered 0|1>`` when a message is taken from
the queue; ``ACKING``/``ACKED <id>`` around ``channel.ack``; ``REPLYING``/``REPLIED
<id>`` around ``channel.send(msg.reply(...))``. What is done with a message follows
from the number in its id (``<host-N@...>``): N % 3 == 0 ack, 1 reply, 2 nothing.
MODE ``collect``: do nothing with any message; after the first completed sync pass,
print what is on the queue and then ``DONE``.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys

from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def action(message_id: str) -> str:
    found = re.search(r"host-(\d+)@", message_id)
    n = int(found.group(1)) if found else 2
    return ("ack", "reply", "none")[n % 3]


async def main(config: EmailConfig, mode: str) -> None:
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        if mode == "collect":
            await channel.sync.synced.wait()
            while not queue.empty():
                msg = queue.get_nowait()
                out(f"GOT {msg.id} {int(msg.redelivered)}")
            out("DONE")
            listener.cancel()
            return
        while True:
            msg = await queue.get()
            out(f"GOT {msg.id} {int(msg.redelivered)}")
            todo = action(msg.id)
            if todo == "ack":
                out(f"ACKING {msg.id}")
                await channel.ack(msg)
                out(f"ACKED {msg.id}")
            elif todo == "reply":
                out(f"REPLYING {msg.id}")
                await channel.send(msg.reply("Thanks, noted."))
                out(f"REPLIED {msg.id}")


if __name__ == "__main__":
    asyncio.run(main(EmailConfig(**json.loads(sys.argv[1])), sys.argv[2]))
