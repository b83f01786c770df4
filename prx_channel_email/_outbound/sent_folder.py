"""Copies of sent replies in the account's own Sent folder (``save_sent``).

The person running the bot then sees whole conversations, questions and
answers, in their own mail client. The folder is ``sent_folder`` when
configured (named by the server's namespace rules: ``Sent`` is ``INBOX.Sent``
on Courier), else the one marked ``\\Sent`` (RFC 6154 SPECIAL-USE), else one
named "Sent". Saving is best effort: the reply is already delivered, so a
failure here is logged by the outbox and never turns into a resend.
"""

from __future__ import annotations

import asyncio
import logging

from prx_channel_email._net.imap import ImapSession, ImapSettings
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError

log = logging.getLogger("prx_channel_email.sent_folder")  # the name users filter on


class ImapSentFolder:
    """One lazily opened IMAP session that APPENDs sent replies, reopened when it fails."""

    def __init__(self, config: EmailConfig, tokens: TokenManager | None = None) -> None:
        self.config = config
        self.imap = ImapSettings.from_config(config)
        self.tokens = tokens  # the account's OAuth tokens (None: a password login)
        self._session: ImapSession | None = None
        self._folder: str | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> tuple[ImapSession, str]:
        session = self._session
        if session is None or not session.is_open:
            session = await ImapSession.connect(self.imap, tokens=self.tokens)
            try:
                await session.login()
            except BaseException:
                session.abort()
                raise
            self._session = session
        if self._folder is None and self.config.sent_folder:
            # By the server's rules: "Sent" is "INBOX.Sent" on Courier.
            self._folder = await session.resolve_folder(self.config.sent_folder)
        if self._folder is None:
            self._folder = await session.find_special_use("\\Sent")
        if self._folder is None:
            named = [f for f in await session.list_folders() if f.lower() == "sent"]
            self._folder = named[0] if named else None
        if self._folder is None:
            raise ChannelError(
                "no Sent folder: the server marks none \\Sent and none is named 'Sent'; "
                "set sent_folder",
                code="sent_folder_missing",
            )
        return session, self._folder

    async def save(self, raw: bytes, message_id: str) -> None:
        """APPEND ``raw`` (flagged \\Seen) to the Sent folder."""
        async with self._lock:
            try:
                session, folder = await self._ready()
                await session.append(folder, raw, ("\\Seen",))
            except BaseException:
                if self._session is not None:
                    self._session.abort()
                    self._session = None
                raise
            log_event(
                log,
                logging.DEBUG,
                "outbound.saved_to_sent",
                account=self.config.account,
                folder=folder,
                message_id=message_id,
            )

    async def close(self) -> None:
        async with self._lock:
            session, self._session = self._session, None
            if session is not None:
                await session.logout()
