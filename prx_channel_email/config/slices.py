"""Config slices: the small frozen settings objects internal code takes instead of
the whole :class:`~prx_channel_email.config.EmailConfig`.

A slice names only what its code reads, under EmailConfig's own names, so it is
built by name (lists become tuples: a frozen slice holds nothing mutable) and a
field cannot drift in meaning between the config and the code that reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from prx_channel_email.config import EmailConfig


class ConfigSlice:
    """Base of the slices; subclass it as a ``@dataclass(frozen=True)``."""

    @classmethod
    def from_config(cls, config: EmailConfig) -> Self:
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = getattr(config, item.name)
            values[item.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def of(cls, config: EmailConfig | Self) -> Self:
        """``config`` itself when it is this slice already, else its slice."""
        return cls.from_config(config) if isinstance(config, EmailConfig) else config
