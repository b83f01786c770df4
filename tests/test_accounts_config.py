"""Several accounts in one config: inheritance, per-account environment, one error for all."""

from __future__ import annotations

from pathlib import Path

import pytest

from prx_channel_email import ConfigError, load_accounts, load_config
from tests.test_config import _clean_env, write  # noqa: F401 (_clean_env: an autouse fixture)

SECRET = "s3cr3t-Pa55w0rd!"
OTHER_SECRET = "0ther-S3cret#"

SHARED = """
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
allowed_senders = ["@example.com"]
"""

TWO = (
    SHARED
    + f"""
[channels_config.email.accounts.support]
username = "support@example.com"
password = "{SECRET}"
from_address = "support@example.com"
imap_folders = ["INBOX", "Escalations"]

[channels_config.email.accounts.billing-eu]
username = "billing@example.com"
password = "{OTHER_SECRET}"
from_address = "billing@example.com"
imap_port = 1993
capabilities = ["receive", "reply"]
rollout_percent = 10
"""
)


def test_accounts_inherit_every_unset_key_from_the_top_level_table(tmp_path: Path) -> None:
    accounts = load_accounts(write(tmp_path, TWO))
    assert list(accounts) == ["support", "billing-eu"]
    support, billing = accounts["support"], accounts["billing-eu"]
    assert support.imap_host == billing.imap_host == "imap.example.com"
    assert support.allowed_senders == billing.allowed_senders == ["@example.com"]
    assert support.imap_folders == ["INBOX", "Escalations"]
    assert billing.imap_folders == ["INBOX"]  # default: [imap_folder]
    assert (support.imap_port, billing.imap_port) == (993, 1993)
    assert support.capabilities == ["receive", "reply", "send", "tools"]
    assert billing.capabilities == ["receive", "reply"]
    assert (support.rollout_percent, billing.rollout_percent) == (100, 10)
    assert support.password is not None and support.password.get_secret_value() == SECRET


def test_without_accounts_the_table_is_the_one_account_default(tmp_path: Path) -> None:
    text = SHARED + f'username = "bot@example.com"\npassword = "{SECRET}"\n'
    text += 'from_address = "bot@example.com"\n'
    path = write(tmp_path, text)
    accounts = load_accounts(path)
    assert list(accounts) == ["default"]
    assert accounts["default"] == load_config(path)
    assert accounts["default"].imap_folders == ["INBOX"]


def test_the_new_fields_have_the_contract_defaults(tmp_path: Path) -> None:
    cfg = load_accounts(write(tmp_path, TWO))["support"]
    assert cfg.metrics_port == 0 and cfg.metrics_host == "127.0.0.1"
    assert cfg.lease_secs == 30 and cfg.state_url is None and cfg.replica_id
    assert (cfg.tools_scope, cfg.tools_write, cfg.tools_max_chars) == ("allowed", False, 20000)


def test_environment_overrides_per_account_then_for_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, TWO)
    monkeypatch.setenv("PRX_EMAIL_BILLING_EU__PASSWORD", "from-env")
    monkeypatch.setenv("PRX_EMAIL_SUPPORT__IMAP_FOLDERS", "INBOX,Urgent")
    monkeypatch.setenv("PRX_EMAIL_IMAP_HOST", "imap.other.example")
    monkeypatch.setenv("PRX_EMAIL_SUPPORT__IMAP_HOST", "imap.support.example")
    accounts = load_accounts(path)
    billing, support = accounts["billing-eu"], accounts["support"]
    assert billing.password is not None and billing.password.get_secret_value() == "from-env"
    assert support.password is not None and support.password.get_secret_value() == SECRET
    assert support.imap_folders == ["INBOX", "Urgent"]
    # The account's own variable beats the general one, which beats the file.
    assert support.imap_host == "imap.support.example"
    assert billing.imap_host == "imap.other.example"


def test_one_error_names_every_problem_with_account_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        SHARED
        + f"""
imap_port = "not a port"
mystery = 1

[channels_config.email.accounts.support]
username = "support@example.com"
password = "{SECRET}"
from_address = "not an address"
imap_folders = ["INBOX", "inbox"]
capabilities = ["receive", "teleport"]
rollout_percent = 150

[channels_config.email.accounts.billing]
username = "billing@example.com"
from_address = "billing@example.com"
state_dir = "/elsewhere"
metrics_port = 9100
colour = "blue"

["channels_config".email.accounts."bad name"]
username = "x@example.com"
"""
    )
    monkeypatch.setenv("PRX_EMAIL_SUPPORT__PASSWROD", OTHER_SECRET)  # misspelt variable
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_accounts(path)
    err = info.value
    text_of = str(err)
    assert str(path) in text_of
    for expected in (
        "imap_port:",  # inherited: reported once, as the shared table's
        "mystery: unknown field",
        "accounts.support.from_address:",
        "accounts.support.imap_folders:",
        "accounts.support.capabilities:",
        "accounts.support.rollout_percent:",
        "accounts.support.passwrod: unknown field",
        "accounts.billing.password: required (set it in the file or in PRX_EMAIL_BILLING__PASS",
        "accounts.billing.colour: unknown field",
        "accounts.billing.state_dir: a service-wide setting",
        "accounts.billing.metrics_port: a service-wide setting",
        "accounts.bad name: an account name",
    ):
        assert expected in text_of, expected
    assert not any(p.startswith("accounts.support.imap_port") for p in err.problems)
    assert SECRET not in text_of and OTHER_SECRET not in text_of


def test_an_account_may_repeat_a_service_wide_value_but_not_change_it(tmp_path: Path) -> None:
    text = TWO.replace(
        "[channels_config.email.accounts.support]\n",
        "[channels_config.email.accounts.support]\nmetrics_port = 0\n",
    )
    assert load_accounts(write(tmp_path, text))["support"].metrics_port == 0


def test_accounts_whose_variables_would_collide_are_refused(tmp_path: Path) -> None:
    text = TWO + '\n[channels_config.email.accounts.billing_eu]\nusername = "b@example.com"\n'
    with pytest.raises(ConfigError, match=r"accounts\.billing_eu: the same variables"):
        load_accounts(write(tmp_path, text))


def test_more_folders_than_connections_allowed_is_refused(tmp_path: Path) -> None:
    folders = ", ".join(f'"F{i}"' for i in range(11))
    text = TWO.replace('imap_folders = ["INBOX", "Escalations"]', f"imap_folders = [{folders}]")
    with pytest.raises(ConfigError, match=r"accounts\.support\.imap_folders: 11 folders"):
        load_accounts(write(tmp_path, text))


def test_load_config_reads_a_single_named_account_and_refuses_several(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="load_accounts"):
        load_config(write(tmp_path, TWO))
    one = TWO[: TWO.index("[channels_config.email.accounts.billing-eu]")]
    assert load_config(write(tmp_path, one)).username == "support@example.com"


def test_state_url_password_is_masked_in_the_redacted_view(tmp_path: Path) -> None:
    text = TWO.replace(
        SHARED, SHARED + 'state_url = "postgresql://prx:hunter2@db.example.com:5432/prx"\n'
    )
    cfg = load_accounts(write(tmp_path, text))["support"]
    shown = cfg.redacted()
    assert shown["state_url"] == "postgresql://prx:********@db.example.com:5432/prx"
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(shown)


def test_two_accounts_with_one_login_are_refused(tmp_path: Path) -> None:
    text = TWO.replace('username = "billing@example.com"', 'username = "support@example.com"')
    text = text.replace("imap_port = 1993\n", "")
    with pytest.raises(ConfigError, match=r"accounts\.billing-eu\.username: the same login"):
        load_accounts(write(tmp_path, text))
