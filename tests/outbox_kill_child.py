"""Kill-test child: send one reply through the outbox with the kill hook armed.

Run as ``python -m tests.outbox_kill_child CONFIG_JSON``; the outbox SIGKILLs the
process right after the SMTP server accepted the message, before recording it
as sent (``PRX_EMAIL_TEST_KILL_AFTER_ACCEPT=1`` must be set by the caller).
Prints the Message-ID only if it was (wrongly) not killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from prx_channel_email.config import EmailConfig
from prx_channel_email.models import SendMessage
from prx_channel_email.observability import Metrics
from prx_channel_email.outbox import Outbox
from prx_channel_email.store import StateStore


async def main(config: EmailConfig, recipient: str) -> None:
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), lease_secs=0.5)
        await outbox.start()
        mid = await outbox.send(SendMessage(content="sent just before dying", recipient=recipient))
        print(mid, flush=True)
        await outbox.close()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    recipient = spec.pop("recipient")
    asyncio.run(main(EmailConfig(**spec), recipient))
