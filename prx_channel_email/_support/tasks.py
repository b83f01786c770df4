"""Small asyncio helpers shared by the flows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def to_completion(aw: Awaitable[None], on_cancel: Callable[[], None] | None = None) -> None:
    """Finish ``aw`` even when cancelled meanwhile (a state write that must not be cut
    in half by a clean stop); the cancellation is re-raised after.

    ``on_cancel`` runs when the cancellation arrives: it may tell ``aw`` to stop
    waiting for something that may never come (a disk that stays read-only), so a
    stop cannot hang; whatever ``aw`` then raises is superseded by the cancellation.
    """
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: its failure was logged where it happened
        raise
