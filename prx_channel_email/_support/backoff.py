"""Exponential backoff with full jitter, shared by reconnects and send retries."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``base * factor**n`` capped at ``cap``, jittered to spread reconnect storms.

    ``reset()`` after a healthy session brings the next delay back to ``base``.
    """

    base: float = 1.0
    cap: float = 300.0
    factor: float = 2.0
    jitter: float = 0.5
    failures: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def peek(self, failures: int | None = None) -> float:
        n = self.failures if failures is None else failures
        raw = min(self.cap, self.base * (self.factor ** min(n, 64)))
        low = raw * (1.0 - self.jitter)
        return low + (raw - low) * self._rng.random()

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = self.peek()
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
