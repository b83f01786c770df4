"""Shared helpers for the OAuth tests: a config signed in on the OAuth fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prx_channel_email.config import EmailConfig
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.oauth_server import CLIENT_ID, OAuthServer
from tests.servers.smtp import SmtpServer

ANN = "ann@people.example"


def oauth_config(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot: DovecotServer,
    smtp: SmtpServer,
    account: Account,
    *,
    seed: bool = True,
    **overrides: Any,
) -> EmailConfig:
    """IMAP on ``dovecot`` and SMTP on ``smtp`` as ``account``, signed in with OAuth.

    ``seed``: configure a refresh token issued for the account (as an operator
    pasting one would); without it the store must come from a login.
    """
    url = oauth_server.url
    fields: dict[str, Any] = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.imaps_port,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp.tls_port,
        "smtp_security": "tls",
        "username": account.username,
        "from_address": account.address,
        "ca_file": dovecot.ca_file,
        "state_dir": tmp_path / "state",
        "connect_timeout_secs": 5.0,
        "command_timeout_secs": 5.0,
        "allowed_senders": ["*"],
        "sender_auth": "off",
        "auth_method": "oauth2",
        "oauth_provider": "custom",
        "oauth_client_id": CLIENT_ID,
        "oauth_token_url": f"{url}/token",
        "oauth_authorize_url": f"{url}/authorize",
        "oauth_device_url": f"{url}/device",
        "oauth_revoke_url": f"{url}/revoke",
        "oauth_scopes": ["mail"],
    }
    if seed:
        fields["oauth_refresh_token"] = oauth_server.issue(account.username)
    fields.update(overrides)
    return EmailConfig(**fields)


def human_mail(mid: str, subject: str, body: str = "hi", *, to: str) -> bytes:
    lines = [
        f"From: Ann Example <{ANN}>",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Mon, 05 Jan 2026 10:00:00 +0000",
        f"Message-ID: {mid}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        body,
        "",
    ]
    return "\r\n".join(lines).encode()
