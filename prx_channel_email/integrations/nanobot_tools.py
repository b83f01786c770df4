"""The mailbox tools as nanobot tools (``email_search``, ``email_get`` ...).

nanobot loads tool plugins from the entry-point group ``nanobot.tools`` (declared in
pyproject.toml for each class below). A tool is enabled when nanobot's config has
the ``prx_email`` channel enabled; a write tool only when its ``toolsWrite`` is true,
as MCP lists them. When called, it runs on the channel this gateway runs (see
``_tools.py``), so it shows exactly what that channel would hand on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from nanobot.agent.tools.base import Tool, ToolResult

from prx_channel_email._tools.specs import BY_NAME, SPECS, ToolSpec
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError

from ._tools import run_json
from .nanobot import NAME, email_config


def configured() -> EmailConfig | None:
    """The enabled ``prx_email`` channel's settings in nanobot's config, else None."""
    try:
        from nanobot.config.loader import load_config

        channels = load_config().channels
        section = getattr(channels, NAME, None)
        if section is None:
            section = (getattr(channels, "model_extra", None) or {}).get(NAME)
        if section is None:
            return None
        enabled = section.get("enabled") if isinstance(section, dict) else section.enabled
        if not enabled:
            return None
        return email_config(section)
    except (ChannelError, OSError, ValueError, AttributeError):
        return None


class EmailTool(Tool):
    """One mailbox tool; the subclasses below differ only in their ``spec``."""

    spec: ClassVar[ToolSpec]
    _plugin_discoverable = False  # the base itself is no tool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.spec.parameters)

    @property
    def read_only(self) -> bool:
        return not self.spec.write

    @classmethod
    def enabled(cls, ctx: Any) -> bool:
        config = configured()
        if config is None or "tools" not in config.capabilities:
            return False
        return config.tools_write or not cls.spec.write

    async def execute(self, **kwargs: Any) -> Any:
        text, failed = await run_json(self.spec.name, kwargs)
        return ToolResult.error(text) if failed else text


def _tool(name: str) -> type[EmailTool]:
    spec = BY_NAME[name]
    title = "".join(part.capitalize() for part in name.split("_")) + "Tool"
    return type(title, (EmailTool,), {"spec": spec, "_plugin_discoverable": True})


EmailListFoldersTool = _tool("email_list_folders")
EmailSearchTool = _tool("email_search")
EmailGetTool = _tool("email_get")
EmailThreadTool = _tool("email_thread")
EmailAttachmentTextTool = _tool("email_attachment_text")
EmailMarkReadTool = _tool("email_mark_read")
EmailMoveTool = _tool("email_move")
EmailSendTool = _tool("email_send")
EmailReplyTool = _tool("email_reply")

TOOLS: tuple[type[EmailTool], ...] = (
    EmailListFoldersTool, EmailSearchTool, EmailGetTool, EmailThreadTool,
    EmailAttachmentTextTool, EmailMarkReadTool, EmailMoveTool, EmailSendTool, EmailReplyTool,
)  # fmt: skip
assert {t.spec.name for t in TOOLS} == {s.name for s in SPECS}
