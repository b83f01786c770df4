"""The mailbox tools for a host's own tool registry (nanobot, hermes), host-free.

A running channel publishes its :class:`MailboxTools` here; a host's tool looks it
up when the model calls it, so the agent sees the same tools, names and rules as
over MCP (one set of specs: ``_tools/specs.py``). A host may run a tool on another
thread's event loop (hermes does): the call is then handed to the loop the channel
runs on, whose IMAP sessions it must use.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prx_channel_email._tools import MailboxTools
from prx_channel_email._tools.specs import call, error_result
from prx_channel_email.errors import ChannelError

_live: list[tuple[MailboxTools, asyncio.AbstractEventLoop]] = []


def publish(tools: MailboxTools) -> Callable[[], None]:
    """Offer ``tools`` (of a channel running on this loop) to the host; returns the withdrawal."""
    entry = (tools, asyncio.get_running_loop())
    _live.append(entry)

    def withdraw() -> None:
        if entry in _live:
            _live.remove(entry)

    return withdraw


def live() -> MailboxTools | None:
    """The tools of the channel running in this process (the latest started), if any."""
    return _live[-1][0] if _live else None


def available(*, write: bool = False) -> bool:
    """Whether a host should offer a tool now: a channel runs (and, for a write tool,
    its tools may write)."""
    tools = live()
    return tools is not None and bool(tools.accounts) and (tools.writable or not write)


async def run(name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The result of tool ``name``, or ``{"error": {"code", "message"}}``: a model reads both."""
    if not _live:
        return error_result(
            ChannelError("the email channel is not running in this process", code="not_running")
        )
    tools, home = _live[-1]
    try:
        if asyncio.get_running_loop() is home:
            return await call(tools, name, arguments)
        future = asyncio.run_coroutine_threadsafe(call(tools, name, arguments), home)
        return await asyncio.wrap_future(future)
    except ChannelError as exc:
        return error_result(exc)


async def run_json(name: str, arguments: dict[str, Any] | None) -> tuple[str, bool]:
    """(the result as JSON text, whether it is an error): what text-based hosts return."""
    result = await run(name, arguments)
    return json.dumps(result, ensure_ascii=False), "error" in result and len(result) == 1
