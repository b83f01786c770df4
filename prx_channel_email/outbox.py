"""The outbox: every reply is stored before it is sent, and sent exactly once.

(Interface stub: the implementation arrives with the outbound issue.)
"""

from __future__ import annotations

from .config import EmailConfig
from .models import SendMessage
from .observability import Metrics
from .store import StateStore


class Outbox:
    def __init__(self, config: EmailConfig, store: StateStore, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.healthy = True

    async def start(self) -> None:
        """Start the background worker; it also sends what an earlier run left pending."""

    async def send(self, message: SendMessage) -> str:
        """Compose, store, and try to send; returns the Message-ID. Raises SendError."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the worker; pending items stay in the store for the next start."""
