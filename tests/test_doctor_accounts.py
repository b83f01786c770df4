"""``prx-email doctor`` on a config with several accounts: every account is checked
(or the one named by ``--account``), each report says whose it is, and the exit
code is the worst of them. Real Dovecot and SMTP fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prx_channel_email.cli import app
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer
from tests.test_doctor import make_table

runner = CliRunner()
PER_ACCOUNT = ("username", "password", "from_address")


@pytest.fixture
def two_accounts(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> Path:
    """``good`` logs in; ``locked`` has a wrong password. Everything else is shared."""
    table = make_table(dovecot, account, smtp_server, tmp_path, sender_auth="off")
    other = dovecot.add_user()
    shared = {k: v for k, v in table.items() if k not in PER_ACCOUNT}
    lines = ["[channels_config.email]", *(f"{k} = {json.dumps(v)}" for k, v in shared.items())]
    for name, (user, password) in {
        "good": (account, account.password),
        "locked": (other, "not-the-password"),
    }.items():
        lines += [
            f"[channels_config.email.accounts.{name}]",
            f"username = {json.dumps(user.username)}",
            f"password = {json.dumps(password)}",
            f"from_address = {json.dumps(user.address)}",
        ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def doctor(*args: str) -> tuple[int, Any]:
    result = runner.invoke(app, ["doctor", "--json", *args])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else None


def failed(report: dict[str, Any]) -> list[str]:
    return [c["name"] for c in report["checks"] if c["status"] == "fail"]


def test_every_account_is_checked_and_the_worst_decides(two_accounts: Path) -> None:
    code, data = doctor("-c", str(two_accounts))
    assert code == 1
    assert data["exit_code"] == 1 and not data["ok"]
    assert list(data["accounts"]) == ["good", "locked"]
    good, locked = data["accounts"]["good"], data["accounts"]["locked"]
    assert good["account"] == "good" and good["exit_code"] == 0, failed(good)
    assert failed(locked) == ["imap login"]
    assert "not-the-password" not in json.dumps(data)


def test_one_account_alone(two_accounts: Path) -> None:
    code, data = doctor("-c", str(two_accounts), "--account", "good")
    assert code == 0, failed(data)
    assert data["account"] == "good"
    assert "accounts" not in data  # one report, in the shape of a one-account config
    text = runner.invoke(app, ["doctor", "-c", str(two_accounts), "--account", "locked"])
    assert text.exit_code == 1
    assert "account locked" in text.stdout and "imap login" in text.stdout


def test_an_account_the_config_does_not_have_is_a_config_error(two_accounts: Path) -> None:
    code, data = doctor("-c", str(two_accounts), "--account", "sales")
    assert code == 2
    (check,) = data["checks"]
    assert "sales" in check["detail"] and "good, locked" in check["detail"]
