"""Config slices: internal code gets the settings it reads, and the OAuth token
manager is handed to each connection, never found on the (frozen, shareable) config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import EmailChannel
from prx_channel_email._inbound.attachments import AttachmentLimits
from prx_channel_email._inbound.policy import PolicySettings
from prx_channel_email._net.imap import ImapSettings, open_session
from prx_channel_email._net.smtp import SmtpSettings, SmtpTransport
from prx_channel_email._net.tls import TlsSettings
from prx_channel_email._outbound.compose import ComposeSettings
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


def _password_config(tmp_path: Path, **values: Any) -> EmailConfig:
    base: dict[str, Any] = {
        "imap_host": "imap.example.test",
        "smtp_host": "smtp.example.test",
        "username": "bot@example.test",
        "password": "pw-never-shown",
        "smtp_password": "smtp-pw-never-shown",
        "from_address": "bot@example.test",
        "state_dir": tmp_path,
    }
    return EmailConfig(**{**base, **values})


def test_the_connection_slices_are_frozen_and_never_show_a_password(tmp_path: Path) -> None:
    config = _password_config(tmp_path, smtp_port=587)
    imap, smtp = ImapSettings.from_config(config), SmtpSettings.from_config(config)
    shown = repr(imap) + repr(smtp) + str(imap) + str(smtp)
    assert "pw-never-shown" not in shown
    # What they carry is what the config says (derived values included).
    assert imap.imap_login == config.imap_login and smtp.smtp_login == config.smtp_login
    assert smtp.smtp_effective_security == "starttls" == config.smtp_effective_security
    with pytest.raises(dataclasses.FrozenInstanceError):
        imap.imap_host = "elsewhere.example"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("host", "allow_insecure"),
    [
        ("127.0.0.1", False),
        ("[::1]", False),
        ("localhost", False),
        ("mail.localhost", False),
        ("mail.example.test", False),
        ("mail.example.test", True),
    ],
)
def test_the_plaintext_rule_is_the_configs(tmp_path: Path, host: str, allow_insecure: bool) -> None:
    """The connection code and the config's validation answer alike (one rule)."""
    config = _password_config(tmp_path, allow_insecure=allow_insecure)
    assert TlsSettings.from_config(config).plaintext_allowed(host) == config.plaintext_allowed(host)


SLICES = [
    TlsSettings,
    ImapSettings,
    SmtpSettings,
    ComposeSettings,
    AttachmentLimits,
    PolicySettings,
]


@pytest.mark.parametrize("slice_type", SLICES, ids=lambda s: s.__name__)
def test_each_slice_carries_the_configs_values_under_the_configs_names(
    tmp_path: Path, slice_type: Any
) -> None:
    """A slice holds a subset of EmailConfig, named and valued as there (lists become
    tuples: a frozen slice holds nothing mutable); so no field can drift in meaning."""
    config = _password_config(
        tmp_path,
        allowed_senders=["@people.example"],
        own_addresses=["alias@example.test"],
        from_name="Bot",
        ca_file=None,
        allow_insecure=True,
    )
    taken = slice_type.from_config(config)
    for item in dataclasses.fields(taken):
        value = getattr(taken, item.name)
        if isinstance(value, TlsSettings):
            assert value == TlsSettings.from_config(config)
            continue
        expected = getattr(config, item.name)
        assert value == (tuple(expected) if isinstance(expected, list) else expected), item.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(taken, dataclasses.fields(taken)[0].name, None)


def test_the_channels_parts_hold_slices_not_the_config(tmp_path: Path) -> None:
    config = _password_config(tmp_path)
    channel = EmailChannel(config)
    assert isinstance(channel.pipeline.policy.config, PolicySettings)
    assert isinstance(channel.outbox.transport.config, SmtpSettings)
    assert channel.outbox.compose_settings == ComposeSettings.from_config(config)
