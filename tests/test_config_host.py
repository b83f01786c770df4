"""Configuration built by a host: keyword arguments against the environment,
``EmailConfig.from_table`` with a host's camelCase table, and ``--config`` paths
that are not regular files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from prx_channel_email import ConfigError, EmailConfig, load_config
from prx_channel_email.config import MAX_CONFIG_BYTES
from tests.operator_helpers import ROOT, subprocess_env
from tests.test_config import _clean_env  # noqa: F401 (autouse: no PRX_EMAIL_* leaks in)

SECRET = "s3cr3t-Pa55w0rd!"

TABLE: dict[str, Any] = {
    "imap_host": "imap.example.com",
    "smtp_host": "smtp.example.com",
    "username": "bot@example.com",
    "password": SECRET,
    "from_address": "bot@example.com",
    "sender_auth": "off",
}


def _no_leak(err: ConfigError) -> None:
    assert SECRET not in str(err)
    assert err.__cause__ is None and err.__suppress_context__


def test_keyword_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRX_EMAIL_PASSWORD", "from-env")
    monkeypatch.setenv("PRX_EMAIL_IMAP_PORT", "1993")
    monkeypatch.setenv("PRX_EMAIL_DEFAULT_SUBJECT", "From env")
    cfg = EmailConfig(**{**TABLE, "imap_port": 143, "imap_security": "starttls"})
    assert cfg.password is not None and cfg.password.get_secret_value() == SECRET
    assert cfg.imap_port == 143
    # A field the code did not give is still filled from the environment.
    assert cfg.default_subject == "From env"


def test_the_environment_still_overrides_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRX_EMAIL_PASSWORD", "from-env")
    monkeypatch.setenv("PRX_EMAIL_ALLOWED_SENDERS", "Alice@Example.com")
    cfg = EmailConfig.from_table({**TABLE, "allowed_senders": ["bob@example.com"]})
    assert cfg.password is not None and cfg.password.get_secret_value() == "from-env"
    assert cfg.allowed_senders == ["alice@example.com"]


def test_from_table_takes_camel_case_keys() -> None:
    table = {
        "imapHost": "imap.example.com",
        "imapPort": 1993,
        "smtpHost": "smtp.example.com",
        "username": "bot@example.com",
        "password": SECRET,
        "fromAddress": "bot@example.com",
        "allowedSenders": ["Alice@Example.com", "@corp.example"],
        "idleTimeoutSecs": 600,
        "senderAuth": "flag",
        "trustedAuthservIds": ["mx.example.com"],
    }
    cfg = EmailConfig.from_table(table)
    assert (cfg.imap_host, cfg.imap_port, cfg.idle_timeout_secs) == ("imap.example.com", 1993, 600)
    assert cfg.from_address == "bot@example.com"
    assert cfg.allowed_senders == ["alice@example.com", "@corp.example"]
    assert (cfg.sender_auth, cfg.trusted_authserv_ids) == ("flag", ["mx.example.com"])


def test_from_table_refuses_unknown_keys_as_written() -> None:
    with pytest.raises(ConfigError) as info:
        EmailConfig.from_table({**TABLE, "imapHots": "x", "allowFrom": ["*"]}, path="host.json")
    assert sorted(info.value.problems) == [
        "allowFrom: unknown field (check the spelling)",
        "imapHots: unknown field (check the spelling)",
    ]
    assert info.value.path == "host.json"
    assert "host.json" in str(info.value)
    _no_leak(info.value)


def test_from_table_refuses_a_key_given_twice() -> None:
    with pytest.raises(ConfigError) as info:
        EmailConfig.from_table({**TABLE, "imapHost": "other.example.com"})
    assert info.value.problems == ["imap_host: given twice (as imap_host and as imapHost)"]


def test_from_table_names_every_bad_value_without_echoing_it() -> None:
    table = {**TABLE, "imapPort": 70000, "fromAddress": "nope", "password": [SECRET]}
    del table["from_address"]
    with pytest.raises(ConfigError) as info:
        EmailConfig.from_table(table)
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["from_address", "imap_port", "password"]
    assert not isinstance(info.value, ValidationError)
    _no_leak(info.value)


def test_from_table_refuses_what_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match="expected a table"):
        EmailConfig.from_table(["imap_host"])  # type: ignore[arg-type]


def test_a_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRX_EMAIL_ALLOWED_SENDERS", '["unclosed')
    with pytest.raises(ConfigError) as info:
        EmailConfig.from_table(TABLE)
    assert "allowed_senders" in str(info.value)
    _no_leak(info.value)
    monkeypatch.setenv("PRX_EMAIL_ALLOWED_SENDERS", "not an address")
    with pytest.raises(ConfigError) as info:
        EmailConfig(**TABLE)
    assert info.value.problems[0].startswith("allowed_senders:")


def test_keyword_errors_are_config_errors_and_value_errors() -> None:
    with pytest.raises(ConfigError) as info:
        EmailConfig(**{**TABLE, "smtp_port": 0, "imap_host": " "})
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["imap_host", "smtp_port"]
    assert isinstance(info.value, ValueError)
    _no_leak(info.value)


def test_a_host_model_embedding_the_config_reports_through_pydantic() -> None:
    class HostSettings(BaseModel):
        email: EmailConfig

    assert HostSettings(email=EmailConfig(**TABLE)).email.imap_host == "imap.example.com"
    with pytest.raises(ValidationError):
        HostSettings.model_validate({"email": {**TABLE, "imap_port": "many"}})


# --- --config: only regular files, bounded ---


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "prx_channel_email.cli", "config", "--config", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "not a regular file" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_device_is_refused_not_read() -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "config.toml"
    with big.open("wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)


# --- the environment is read by pydantic-settings: PRX_EMAIL_* and nothing else ---


def test_environment_names_any_case_and_lists_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("prx_email_imap_port", "1993")
    monkeypatch.setenv("Prx_Email_Own_Addresses", '["Me@Example.com", "alias@example.com"]')
    cfg = EmailConfig.from_table(TABLE)
    assert cfg.imap_port == 1993
    assert cfg.own_addresses == ["me@example.com", "alias@example.com"]


def test_no_dotenv_file_and_no_settings_options_from_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("PRX_EMAIL_DEFAULT_SUBJECT=from dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["host", "--default_subject=from argv"])
    assert EmailConfig(**TABLE).default_subject == "PRX Message"
    # BaseSettings' own keyword options are unknown fields here, never obeyed.
    with pytest.raises(ConfigError) as info:
        EmailConfig.from_table(
            {**TABLE, "imap_port": 0, "_env_file": ".env", "_cli_parse_args": True},
            path="host.json",
        )
    assert info.value.problems == [
        "imap_port: Input should be greater than or equal to 1",
        "_env_file: unknown field (check the spelling)",
        "_cli_parse_args: unknown field (check the spelling)",
    ]
    with pytest.raises(ConfigError) as info:
        EmailConfig(**{**TABLE, "_secrets_dir": str(tmp_path)})
    assert info.value.problems == ["_secrets_dir: unknown field (check the spelling)"]
    _no_leak(info.value)


def test_a_variable_pydantic_settings_cannot_decode_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every list field takes its text as is (NoDecode); a field pydantic-settings
    # decodes itself (a dict, in a host's subclass) fails inside pydantic-settings.
    class HostEmailConfig(EmailConfig):
        labels: dict[str, str] = {}

    monkeypatch.setenv("PRX_EMAIL_LABELS", '{"secret": "' + SECRET)
    with pytest.raises(ConfigError) as info:
        HostEmailConfig.from_table(TABLE, path="host.json")
    assert info.value.problems == ["labels: PRX_EMAIL_LABELS could not be decoded"]
    assert "host.json" in str(info.value)
    _no_leak(info.value)
