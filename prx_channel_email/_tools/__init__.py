"""The mailbox tools for the agent (``channel.tools``, ``prx-email mcp``, host tool registries).

Search, read, thread and attachment text over the channel's own IMAP account(s),
showing only what the channel itself would hand on (``tools_scope``), writing only
when ``tools_write`` allows it, and marking every text from mail as untrusted.
"""

from prx_channel_email._tools.mailbox import MailboxTools, ToolAccount

__all__ = ["MailboxTools", "ToolAccount"]
