"""Structured logs and counters.

Log records carry their fields both in the text (``key=value``, greppable) and as
``record.prx`` (a dict, for JSON handlers). Callers pass account, folder, uid,
message_id and an error ``code``; never a secret.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

logger = logging.getLogger("prx_channel_email")


# A value is written bare only when nothing in it could end it or fake another field.
_BARE_RE = re.compile(r'[^\s"=\\\x00-\x1f\x7f\x85\u2028\u2029]+')
_ESCAPE_RE = re.compile(r'["\\\x00-\x1f\x7f\x85\u2028\u2029]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _fmt(value: Any) -> str:
    """``key=value`` text that reads back unambiguously: a value with a space, quote,
    ``=``, backslash or control character is quoted, its quotes and backslashes
    escaped, so a Subject like ``hi" code=delivered`` cannot pose as a field."""
    text = str(value)
    if _BARE_RE.fullmatch(text):
        return text
    return '"' + _ESCAPE_RE.sub(_escape, text) + '"'


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

    def __init__(self, parent: Metrics | None = None) -> None:
        """``parent``: counts here count there too (a mailbox's counters roll up into
        the channel's totals; a gauge there is the last one set anywhere below)."""
        self._counts: Counter[str] = Counter()
        self._gauges: dict[str, int] = {}
        self._parent = parent

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n
        if self._parent is not None:
            self._parent.inc(name, n)

    def gauge(self, name: str, value: int) -> None:
        """A level rather than a count (e.g. how much mail waits right now)."""
        self._gauges[name] = value
        if self._parent is not None:
            self._parent.gauge(name, value)

    def get(self, name: str) -> int:
        return self._gauges[name] if name in self._gauges else self._counts[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted({**self._counts, **self._gauges}.items()))
