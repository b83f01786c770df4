"""The inbound pipeline: raw RFC 5322 bytes -> parse/normalize -> policy -> Outcome.

(Interface stub: the implementation arrives with the inbound-policy issue.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .config import EmailConfig
from .models import ChannelMessage
from .observability import Metrics
from .store import LedgerEntry


@dataclass(frozen=True)
class Outcome:
    """What the pipeline decided about one message.

    ``deliver``: ``message`` goes on the framework's queue and ``entry`` into the ledger.
    ``reject``: the policy refused it (``reason`` says why); the server copy is left alone.
    ``quarantine``: it could not be understood at all; logged with ``reason``.
    """

    decision: Literal["deliver", "reject", "quarantine"]
    message_id: str
    reason: str | None = None
    message: ChannelMessage | None = None
    entry: LedgerEntry | None = None


class InboundPipeline:
    def __init__(
        self,
        config: EmailConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock

    async def process(self, raw: bytes, *, arrival: float | None = None) -> Outcome:
        raise NotImplementedError

    async def process_oversized(
        self, header_block: bytes, size: int, *, arrival: float | None = None
    ) -> Outcome:
        raise NotImplementedError
