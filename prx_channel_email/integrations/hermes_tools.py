"""The mailbox tools in hermes' tool registry (toolset ``prx_email``).

:func:`register_tools` is called from the plugin's ``register(ctx)``. Each tool is
offered while the ``prx_email`` platform is connected in this gateway (hermes asks
``check_fn`` before it lists a tool); the write tools only when its ``tools_write``
is true, as MCP lists them. hermes runs an async handler on a worker thread's own
event loop: the call is handed to the channel's loop (``_tools.run``).
"""

from __future__ import annotations

from typing import Any

from prx_channel_email._tools.specs import SPECS, ToolSpec

from ._tools import available, run_json

TOOLSET = "prx_email"


def _can_read() -> bool:
    return available()


def _can_write() -> bool:
    return available(write=True)


def _handler(spec: ToolSpec) -> Any:
    async def handle(args: dict[str, Any] | None, **_: Any) -> str:
        text, _failed = await run_json(spec.name, args or {})
        return text

    handle.__name__ = f"prx_email_{spec.method}"
    return handle


def register_tools(ctx: Any) -> list[str]:
    """Register every mailbox tool with hermes (``ctx.register_tool``); returns the names."""
    for spec in SPECS:
        ctx.register_tool(
            name=spec.name,
            toolset=TOOLSET,
            schema={
                "name": spec.name,
                "description": spec.description,
                "parameters": spec.parameters,
            },
            handler=_handler(spec),
            check_fn=_can_write if spec.write else _can_read,
            is_async=True,
            description=spec.description,
            emoji="📧",
        )
    return [spec.name for spec in SPECS]
