"""The sync engine: keeps an IMAP session alive and hands each new message on once.

(Interface stub: the implementation arrives with the inbound-transport issue.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .config import EmailConfig
from .inbound import InboundPipeline
from .models import ChannelMessage
from .observability import Metrics
from .store import StateStore


@dataclass
class SyncStatus:
    connected: bool = False
    mode: str | None = None  # "idle" | "poll"
    auth_failed: bool = False
    last_error: str | None = None
    last_error_code: str | None = None


class SyncEngine:
    def __init__(
        self,
        config: EmailConfig,
        store: StateStore,
        pipeline: InboundPipeline,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.status = SyncStatus()

    async def run(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        raise NotImplementedError
