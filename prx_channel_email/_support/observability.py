"""Structured logs and counters.

Log records carry their fields both in the text (``key=value``, greppable) and as
``record.prx`` (a dict, for JSON handlers). Callers pass account, folder, uid,
message_id and an error ``code``; never a secret.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

logger = logging.getLogger("prx_channel_email")


def _fmt(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def log_event(
    log: logging.Logger, level: int, event: str, /, exc: BaseException | None = None, **fields: Any
) -> None:
    """Log ``event`` with structured fields; ``None`` fields are left out."""
    kept = {k: v for k, v in fields.items() if v is not None}
    if exc is not None:
        kept.setdefault("error", f"{type(exc).__name__}: {exc}")
        code = getattr(exc, "code", None)
        if isinstance(code, str):
            kept.setdefault("code", code)
    text = " ".join(f"{k}={_fmt(v)}" for k, v in kept.items())
    log.log(level, "%s %s", event, text, extra={"prx": {"event": event, **kept}})


class Metrics:
    """Monotonic counters and a few gauges, readable by the host framework as a plain dict.

    Names are dotted: ``imap.connects``, ``imap.reconnects.network``,
    ``inbound.skipped.not_allowed``, ``outbound.sent`` ...
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._gauges: dict[str, int] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def gauge(self, name: str, value: int) -> None:
        """A level rather than a count (e.g. how much mail waits right now)."""
        self._gauges[name] = value

    def get(self, name: str) -> int:
        return self._gauges[name] if name in self._gauges else self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted({**self._counts, **self._gauges}.items()))
