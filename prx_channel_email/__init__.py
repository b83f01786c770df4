"""prx_channel_email: an email channel for agent frameworks.

IMAP IDLE turns mail from allow-listed senders into :class:`ChannelMessage`;
:meth:`EmailChannel.send` answers in the same thread over SMTP, through a durable
outbox. See the README and docs/ for setup and the security model.
"""

from prx_channel_email._tools import MailboxTools
from prx_channel_email._version import __version__
from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig, load_accounts, load_config
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    ConfigError,
    FolderNotFoundError,
    InsecureConnectionError,
    NotReadyError,
    OAuthReauthRequired,
    OAuthUnavailable,
    SendError,
    StorageError,
    TransportError,
)
from prx_channel_email.models import (
    Attachment,
    Channel,
    ChannelMessage,
    QuarantinedMessage,
    SendMessage,
)
from prx_channel_email.status import ChannelState, ChannelStatus, MailboxStatus, RejectedMessage

__all__ = [
    "Attachment",
    "AuthenticationError",
    "Channel",
    "ChannelError",
    "ChannelMessage",
    "ChannelState",
    "ChannelStatus",
    "ConfigError",
    "EmailChannel",
    "EmailConfig",
    "FolderNotFoundError",
    "InsecureConnectionError",
    "MailboxStatus",
    "MailboxTools",
    "NotReadyError",
    "OAuthReauthRequired",
    "OAuthUnavailable",
    "QuarantinedMessage",
    "RejectedMessage",
    "SendError",
    "SendMessage",
    "StorageError",
    "TransportError",
    "__version__",
    "load_accounts",
    "load_config",
]
