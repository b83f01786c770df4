"""One provider table: config, OAuth and the doctor read the same rows.

The presets themselves are checked where they act (test_policy.py: trusted
authserv-ids; test_doctor.py: the login fix; test_oauth*.py: the endpoints).
Here: that the three users agree, because they all ask config/providers.py.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email.config import EmailConfig
from prx_channel_email.config.providers import (
    CUSTOM,
    GOOGLE,
    MICROSOFT,
    PROTON_BRIDGE,
    PROVIDERS,
    detect_provider,
    oauth_endpoints,
    provider_named,
)
from prx_channel_email.doctor import _login_fix
from prx_channel_email.doctor.oauth import reauth_fix


def _config(tmp_path: Path, **values: Any) -> EmailConfig:
    base: dict[str, Any] = {
        "imap_host": "imap.example.test",
        "smtp_host": "smtp.example.test",
        "username": "bot@example.test",
        "password": "pw",
        "from_address": "bot@example.test",
        "state_dir": tmp_path,
    }
    return EmailConfig(**{**base, **values})


def _oauth(tmp_path: Path, provider: str, **values: Any) -> EmailConfig:
    extra: dict[str, Any] = {}
    if provider == "custom":
        extra = {
            "oauth_token_url": "https://login.example.test/token",
            "oauth_authorize_url": "https://login.example.test/authorize",
        }
    return _config(
        tmp_path,
        auth_method="oauth2",
        password=None,
        oauth_provider=provider,
        oauth_client_id="client",
        **{**extra, **values},
    )


def test_every_oauth_provider_the_config_accepts_has_a_row_with_endpoints() -> None:
    accepted = typing.get_args(
        typing.get_args(EmailConfig.model_fields["oauth_provider"].annotation)[0]
    )
    assert set(accepted) == {"google", "microsoft", "custom"}
    for key in accepted:
        row = provider_named(key)
        assert row.key == key and row.oauth is not None and row.oauth.name == key
    assert provider_named(None) is CUSTOM  # no provider named: the config gives every URL
    keys = [p.key for p in PROVIDERS]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p.authserv_ids])
def test_a_known_imap_host_is_one_provider_to_config_and_doctor_alike(
    tmp_path: Path, provider: Any
) -> None:
    for host in provider.imap_hosts:
        config = _config(tmp_path, imap_host=host)
        assert config.trusted_authserv_ids == list(provider.authserv_ids)
        assert detect_provider(host) is provider
        fix = _login_fix(config, host, 993, "password")
        assert provider.login_hint in fix


def test_the_doctor_detects_hosts_by_domain_and_the_bridge_by_its_loopback_port() -> None:
    assert detect_provider("smtp.office365.com") is MICROSOFT
    assert detect_provider("SMTP.GMAIL.COM.") is GOOGLE
    assert detect_provider("127.0.0.1", 1143) is PROTON_BRIDGE
    assert detect_provider("127.0.0.1", 1025) is PROTON_BRIDGE
    assert detect_provider("127.0.0.1", 993) is None  # any local server is not the Bridge
    assert detect_provider("mail.example.org") is None
    assert detect_provider("notgmail.com") is None  # a domain matches whole labels only


def test_oauth_endpoints_fill_the_tenant_and_let_the_config_override(tmp_path: Path) -> None:
    ms = oauth_endpoints(_oauth(tmp_path, "microsoft", oauth_tenant="contoso.example"))
    assert ms.name == "microsoft"
    assert ms.token_url == "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    assert ms.device_url is not None and "/contoso.example/" in ms.device_url
    assert "offline_access" in ms.scopes and ms.revoke_url is None

    google = oauth_endpoints(_oauth(tmp_path, "google"))
    assert google.device_refusal is not None  # the mail scope is not allowed in it
    assert dict(google.authorize_params)["access_type"] == "offline"
    narrowed = oauth_endpoints(
        _oauth(
            tmp_path,
            "google",
            oauth_scopes=["openid"],
            oauth_token_url="http://127.0.0.1:9/token",
        )
    )
    assert narrowed.scopes == ("openid",) and narrowed.device_refusal is None
    assert narrowed.token_url == "http://127.0.0.1:9/token"
    assert narrowed.authorize_url == google.authorize_url

    custom = oauth_endpoints(_oauth(tmp_path, "custom"))
    assert custom.token_url == "https://login.example.test/token"
    assert custom.device_url is None and custom.scopes == ()


def test_the_doctors_oauth_fixes_are_the_rows_hints(tmp_path: Path) -> None:
    for key in ("google", "microsoft", "custom"):
        config = _oauth(tmp_path, key)
        assert _login_fix(config, config.imap_host, 993, "password") == (
            provider_named(key).oauth_login_hint
        )
    assert "5.7.139" in _login_fix(_oauth(tmp_path, "microsoft"), "x", 993, "password")
    assert "'Testing' mode" in reauth_fix("google")
    assert reauth_fix("custom").startswith("run `prx-email auth login`")
