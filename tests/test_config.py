"""Configuration: defaults, env overrides, and one clear error per bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prx_channel_email import ConfigError, EmailConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Pa55w0rd!"

GOOD = f"""
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "{SECRET}"
from_address = "bot@example.com"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PRX_EMAIL_") or key == "PRX_CONFIG":
            monkeypatch.delenv(key)


def test_defaults_match_the_reference_table(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.imap_port, cfg.imap_folder, cfg.smtp_port, cfg.smtp_tls) == (
        993,
        "INBOX",
        465,
        True,
    )
    assert cfg.idle_timeout_secs == 1740
    assert cfg.allowed_senders == []
    assert cfg.default_subject == "PRX Message"
    assert cfg.imap_security == "tls"
    assert cfg.smtp_effective_security == "tls"
    assert cfg.allow_insecure is False
    assert cfg.password is not None and cfg.password.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("port", "tls", "expected"), [(465, True, "tls"), (587, True, "starttls"), (25, False, "plain")]
)
def test_smtp_security_auto(tmp_path: Path, port: int, tls: bool, expected: str) -> None:
    host = 'smtp_host = "127.0.0.1"\n' if expected == "plain" else ""
    text = GOOD.replace(
        'smtp_host = "smtp.example.com"\n', host or 'smtp_host = "smtp.example.com"\n'
    )
    text += f"smtp_port = {port}\nsmtp_tls = {'true' if tls else 'false'}\n"
    assert load_config(write(tmp_path, text)).smtp_effective_security == expected


def test_example_file_loads_with_credentials_filled_in(tmp_path: Path) -> None:
    text = (ROOT / "config.toml.example").read_text()
    text = text.replace('password = ""', f'password = "{SECRET}"', 1)
    cfg = load_config(write(tmp_path, text))
    assert cfg.imap_host == "imap.gmail.com"
    assert cfg.smtp_effective_security == "tls"


def test_env_overrides_file_and_prx_config_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("PRX_CONFIG", str(path))
    monkeypatch.setenv("PRX_EMAIL_PASSWORD", "from-env")
    monkeypatch.setenv("PRX_EMAIL_IMAP_PORT", "1993")
    monkeypatch.setenv("PRX_EMAIL_ALLOWED_SENDERS", "Alice@Example.com, @corp.example")
    cfg = load_config()
    assert cfg.password is not None and cfg.password.get_secret_value() == "from-env"
    assert cfg.imap_port == 1993
    assert cfg.allowed_senders == ["alice@example.com", "@corp.example"]


def test_an_empty_environment_variable_means_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PRX_EMAIL_CA_FILE=`` (a compose file's empty value) was read as the path ".":
    "ca_file: file '.' does not exist". Empty is unset: the file's value, else the default."""
    monkeypatch.setenv("PRX_EMAIL_CA_FILE", "")
    monkeypatch.setenv("PRX_EMAIL_IMAP_PORT", "")
    monkeypatch.setenv("PRX_EMAIL_DEFAULT__SMTP_PORT", "")
    cfg = load_config(write(tmp_path, GOOD + "smtp_port = 587\n"))
    assert cfg.ca_file is None
    assert cfg.imap_port == 993
    assert cfg.smtp_port == 587


def test_password_can_come_from_env_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRX_EMAIL_PASSWORD", SECRET)
    cfg = load_config(write(tmp_path, GOOD.replace(f'password = "{SECRET}"\n', "")))
    assert cfg.password is not None


def test_default_path_is_cwd_config_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    assert load_config().username == "bot@example.com"


def test_secret_never_in_repr_dump_or_redacted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg)
    assert SECRET not in str(cfg.redacted())
    assert cfg.redacted()["password"] == "********"


def error_for(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    msg = str(err)
    assert SECRET not in msg, "a secret leaked into the error"
    assert "Traceback" not in msg
    chained = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    assert chained is None, "the error must not chain another exception's traceback"
    return err


def test_missing_required_fields_are_all_named(tmp_path: Path) -> None:
    err = error_for(tmp_path, "[channels_config.email]\nimap_host = 'imap.example.com'\n")
    msg = str(err)
    for field in ("smtp_host", "username", "password", "from_address"):
        assert re.search(rf"\b{field}\b", msg), field
    assert "imap_host" not in " ".join(err.problems)
    assert str(tmp_path / "config.toml") in msg


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(tmp_path: Path, port: int) -> None:
    err = error_for(tmp_path, GOOD + f"imap_port = {port}\nsmtp_port = {port}\n")
    assert any(p.startswith("imap_port:") for p in err.problems)
    assert any(p.startswith("smtp_port:") for p in err.problems)


def test_empty_host(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD.replace('"imap.example.com"', '"  "'))
    assert err.problems == ["imap_host: must not be empty"]


def test_bad_allowed_sender_entry(tmp_path: Path) -> None:
    err = error_for(
        tmp_path, GOOD + 'allowed_senders = ["ok@example.com", "not an address", "@"]\n'
    )
    assert len(err.problems) == 1
    assert "allowed_senders" in err.problems[0]
    assert "'not an address'" in err.problems[0] and "'@'" in err.problems[0]


def test_several_bad_fields_in_one_message(tmp_path: Path) -> None:
    text = GOOD.replace('"imap.example.com"', '""') + 'smtp_port = 70000\nfrom_address = "x"\n'
    text = text.replace('from_address = "bot@example.com"\n', "")
    err = error_for(tmp_path, text)
    fields = sorted(p.split(":")[0] for p in err.problems)
    assert fields == ["from_address", "imap_host", "smtp_port"]


def test_toml_syntax_error_gives_line(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD + "imap_port = = 3\n")
    assert "TOML syntax error" in str(err)
    assert "line 8" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_missing_table(tmp_path: Path) -> None:
    err = error_for(tmp_path, "[channels_config.slack]\ntoken = 'x'\n")
    assert "[channels_config.email]" in str(err)


def test_unknown_field_is_named(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD + "imap_prot = 993\n")
    assert err.problems == ["imap_prot: unknown field (check the spelling)"]


def test_wrong_type_does_not_echo_value(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD.replace(f'password = "{SECRET}"', f'password = ["{SECRET}"]'))
    assert any(p.startswith("password:") for p in err.problems)


def test_plaintext_refused_off_loopback(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD + 'imap_security = "plain"\nsmtp_tls = false\n')
    assert any(p.startswith("imap_security:") for p in err.problems)
    assert any(p.startswith("smtp_security:") for p in err.problems)
    ok = GOOD + 'imap_security = "plain"\nallow_insecure = true\n'
    assert load_config(write(tmp_path, ok)).imap_security == "plain"


def test_plaintext_allowed_to_loopback() -> None:
    cfg = EmailConfig(
        imap_host="127.0.0.1",
        smtp_host="localhost",
        username="u",
        password=SECRET,  # type: ignore[arg-type]
        from_address="bot@example.com",
        imap_security="plain",
        smtp_tls=False,
    )
    assert cfg.smtp_effective_security == "plain"


def test_ca_file_must_exist(tmp_path: Path) -> None:
    err = error_for(tmp_path, GOOD + 'ca_file = "/nonexistent/ca.pem"\n')
    assert err.problems[0].startswith("ca_file:")


@pytest.mark.parametrize("field", ["default_subject", "from_name", "sent_folder", "imap_folder"])
def test_line_breaks_in_header_bound_fields_are_refused(tmp_path: Path, field: str) -> None:
    # default_subject = "Hi\r\nBcc: victim@evil.example" would add a real Bcc header.
    err = error_for(tmp_path, GOOD + f'{field} = "Hello\\r\\nBcc: victim@evil.example"\n')
    assert err.problems == [f"{field}: must not contain line breaks or NUL"]


def test_ca_file_that_is_not_a_certificate_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("this is not a certificate\n")
    err = error_for(tmp_path, GOOD + f'ca_file = "{bogus}"\n')
    assert err.problems[0].startswith("ca_file:")
    assert "no usable PEM certificate" in err.problems[0]


def test_only_localhost_and_loopback_literals_count_as_loopback() -> None:
    from prx_channel_email.config import is_loopback

    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("[::1]")
    # A *.localhost name may be resolved through DNS, i.e. off this machine.
    assert not is_loopback("mail.localhost")
    assert not is_loopback("localhost.example.com")
