"""Child process for the SIGKILL test: runs a SyncEngine and prints what it hands on.

Usage: ``python -m tests.fakes.sync_child CONFIG_JSON``. Every message is printed
(and flushed) the moment it is put on the queue, i.e. when it is handed on; after
each completed sync pass the line ``SYNCED`` is printed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from prx_channel_email._inbound.sync import SyncEngine
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.fakes.pipeline import HeaderPipeline


class PrintingQueue(asyncio.Queue[ChannelMessage]):
    def put_nowait(self, item: ChannelMessage) -> None:
        sys.stdout.write(item.id + "\n")
        sys.stdout.flush()
        super().put_nowait(item)


async def main(config: EmailConfig) -> None:
    metrics = Metrics()
    store = await StateStore(config.state_dir).open()
    engine = SyncEngine(
        config, store, HeaderPipeline(config, metrics=metrics), metrics, backoff=Backoff(0.2, 1.0)
    )
    queue = PrintingQueue()
    task = asyncio.create_task(engine.run(queue))
    while not task.done():
        await engine.synced.wait()
        engine.synced.clear()
        sys.stdout.write("SYNCED\n")
        sys.stdout.flush()
        while not queue.empty():
            queue.get_nowait()


if __name__ == "__main__":
    asyncio.run(main(EmailConfig(**json.loads(sys.argv[1]))))
