"""Config slices: internal code gets the settings it reads, and the OAuth token
manager is handed to each connection, never found on the (frozen, shareable) config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import EmailChannel
from prx_channel_email._net.imap import open_session
from prx_channel_email._net.smtp import SmtpTransport
from prx_channel_email.config import EmailConfig


def _oauth_config(tmp_path: Path, **values: Any) -> EmailConfig:
    base: dict[str, Any] = {
        "imap_host": "127.0.0.1",
        "imap_port": 9,
        "smtp_host": "127.0.0.1",
        "smtp_port": 9,
        "username": "bot@example.test",
        "from_address": "bot@example.test",
        "auth_method": "oauth2",
        "oauth_provider": "custom",
        "oauth_client_id": "client",
        "oauth_token_url": "http://127.0.0.1:9/token",
        "oauth_device_url": "http://127.0.0.1:9/device",
        "state_dir": tmp_path,
    }
    return EmailConfig(**{**base, **values})


def test_the_config_carries_no_token_manager(tmp_path: Path) -> None:
    """Two channels built from one config object each get a manager of their own, and
    the config itself stays plain settings (nothing mutable rides on it)."""
    config = _oauth_config(tmp_path)
    first, second = EmailChannel(config), EmailChannel(config)
    assert first.tokens is not None and second.tokens is not None
    assert first.tokens is not second.tokens
    assert not EmailConfig.__private_attributes__
    assert first.config == config  # the same settings, nothing attached


async def test_an_oauth_login_without_its_token_manager_is_a_wiring_error(
    tmp_path: Path,
) -> None:
    """Said before any connection is tried (port 9 would refuse), never a token
    manager made up on the side that would refresh on its own."""
    config = _oauth_config(tmp_path)
    with pytest.raises(ValueError, match="TokenManager"):
        await open_session(config)
    with pytest.raises(ValueError, match="TokenManager"):
        SmtpTransport(config)
