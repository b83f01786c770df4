"""Kill-test child: send one reply through the outbox with the kill hook armed.

Run as ``python -m tests.outbox_kill_child CONFIG_JSON``. With
``PRX_EMAIL_TEST_KILL_AFTER_ACCEPT=1`` in its environment, the child injects an
``on_accepted`` callback into the outbox that SIGKILLs the process right after
the SMTP server accepted the message, before the outbox records it as sent.
Prints the Message-ID only if it was (wrongly) not killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import SendMessage

#: Set to "1" by the test to arm the kill.
KILL_AFTER_ACCEPT_ENV = "PRX_EMAIL_TEST_KILL_AFTER_ACCEPT"


def die(_message_id: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(config: EmailConfig, recipient: str) -> None:
    async with StateStore(config.state_dir) as store:
        armed = os.environ.get(KILL_AFTER_ACCEPT_ENV) == "1"
        outbox = Outbox(
            config, store, Metrics(), lease_secs=0.5, on_accepted=die if armed else None
        )
        await outbox.start()
        mid = await outbox.send(SendMessage(content="sent just before dying", recipient=recipient))
        print(mid, flush=True)
        await outbox.close()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    recipient = spec.pop("recipient")
    asyncio.run(main(EmailConfig(**spec), recipient))
