"""The command line as an operator meets it: help, exit codes, one-paragraph errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prx_channel_email.cli import app, prx_app
from prx_channel_email.config import EmailConfig, config_from_table
from tests.operator_helpers import ROOT, read_until, reaped, subprocess_env
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer
from tests.test_doctor import make_table

runner = CliRunner()


def write_config(path: Path, table: dict[str, Any]) -> Path:
    lines = ["[channels_config.email]"]
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def good_config(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> Path:
    return write_config(
        tmp_path / "config.toml", make_table(dovecot, account, smtp_server, tmp_path)
    )


def test_prx_email_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "run", "send", "demo", "config"):
        assert re.search(rf"\b{command}\b", result.output), command
    assert "prx-email demo" in result.output


def test_prx_channel_doctor_email_help_reads_well() -> None:
    result = runner.invoke(prx_app, ["channel", "doctor", "email", "--help"], prog_name="prx")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "prx channel doctor email" in text
    assert "[channels_config.email]" in text
    assert "--send-test" in text and "--json" in text
    assert "2 the config is invalid" in text


def test_prx_channel_run_email_help() -> None:
    result = runner.invoke(prx_app, ["channel", "run", "email", "--help"], prog_name="prx")
    assert result.exit_code == 0
    assert "module:function" in result.output


def test_doctor_good_config_exits_0(good_config: Path) -> None:
    result = runner.invoke(app, ["doctor", "--config", str(good_config)])
    assert result.exit_code == 0, result.output
    assert "All checks passed" in result.output
    assert "imap login" in result.output


def test_doctor_push_test_measures_push(good_config: Path) -> None:
    result = runner.invoke(app, ["doctor", "--push-test", "--json", "--config", str(good_config)])
    assert result.exit_code == 0, result.output
    idle = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "imap idle")
    assert idle["status"] == "pass" and idle["detail"].startswith("push works ("), idle


def test_prx_channel_doctor_email_same_as_prx_email_doctor(good_config: Path) -> None:
    result = runner.invoke(prx_app, ["channel", "doctor", "email", "-c", str(good_config)])
    assert result.exit_code == 0, result.output
    assert "All checks passed" in result.output


def test_doctor_json_wrong_password_exits_1(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    table = make_table(dovecot, account, smtp_server, tmp_path, password="wrong-one")
    path = write_config(tmp_path / "c.toml", table)
    result = runner.invoke(app, ["doctor", "--json", "--config", str(path)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed[0]["name"] == "imap login"
    assert "app password" in failed[0]["fix"]
    assert "wrong-one" not in result.output


def test_doctor_uses_prx_config_variable(good_config: Path) -> None:
    result = runner.invoke(app, ["doctor"], env={"PRX_CONFIG": str(good_config)})
    assert result.exit_code == 0, result.output


def test_doctor_invalid_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[channels_config.email]\nimap_host = "h"\nallowed_senders = ["not mail"]\n')
    result = runner.invoke(app, ["doctor", "--config", str(path)])
    assert result.exit_code == 2
    assert "allowed_senders" in result.output
    assert "Traceback" not in result.output


def test_missing_config_is_one_paragraph_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    for args in (["config"], ["send", "--to", "a@b.example", "hi"], ["run"]):
        result = runner.invoke(app, [*args, "--config", str(missing)])
        assert result.exit_code == 2, (args, result.output)
        assert "not found" in result.output
        assert "Traceback" not in result.output


def test_config_command_masks_secrets(good_config: Path, account: Account) -> None:
    result = runner.invoke(app, ["config", "--config", str(good_config)])
    assert result.exit_code == 0, result.output
    assert account.password not in result.output
    assert "********" in result.output
    assert "imap_host" in result.output


def test_run_with_a_bad_handler_explains_the_format(good_config: Path) -> None:
    result = runner.invoke(app, ["run", "no_such_module_xyz:handle", "--config", str(good_config)])
    assert result.exit_code == 1
    assert "cannot import handler module" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", "nocolon", "--config", str(good_config)])
    assert result.exit_code == 1
    assert "module:function" in result.output


def test_send_delivers_one_message(good_config: Path, smtp_server: SmtpServer) -> None:
    result = runner.invoke(
        app,
        ["send", "--config", str(good_config), "--to", "rcpt@example.test", "-s", "Hi", "**bold**"],
    )
    assert result.exit_code == 0, result.output
    (msg,) = smtp_server.wait_for_messages(1)
    assert msg.rcpt_tos == ("rcpt@example.test",)
    assert msg.message()["Subject"] == "Hi"


def test_config_example_is_loadable_and_documents_every_field(tmp_path: Path) -> None:
    text = (ROOT / "config.toml.example").read_text()
    doc = tomllib.loads(text)
    table = dict(doc["channels_config"]["email"])
    table["password"] = "an-app-password"
    config = config_from_table(table)
    assert config.imap_host
    lines = text.splitlines()
    for name in EmailConfig.model_fields:
        where = [i for i, line in enumerate(lines) if re.match(rf"^#? ?{name} = ", line)]
        assert where, f"{name} missing from the example"
        line, above = lines[where[0]], lines[where[0] - 1]
        assert "#" in line or above.startswith("#"), f"{name} has no comment"


def start_run(bot: Path, config: Path) -> subprocess.Popen[str]:
    """``prx-email run BOT:handle`` in a child process; returns once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prx_channel_email.cli", "run", f"{bot}:handle", "-c", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=config.parent,
    )
    assert proc.stderr is not None
    try:
        read_until(proc.stderr, "listening")
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return proc


def test_run_answers_with_a_module_handler_and_stops_cleanly_on_sigterm(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    bot = tmp_path / "mybot.py"
    bot.write_text("async def handle(msg):\n    return 'ANSWER to ' + msg.subject\n")
    table = make_table(
        dovecot,
        account,
        smtp_server,
        tmp_path,
        initial_sync="unseen",
        allowed_senders=["alice@example.test"],
    )
    with reaped(start_run(bot, write_config(tmp_path / "config.toml", table))) as proc:
        assert proc.stderr is not None
        dovecot.deliver(
            account,
            b"From: Alice <alice@example.test>\r\nTo: "
            + account.address.encode()
            + b"\r\nSubject: question\r\nMessage-ID: <q1@example.test>\r\n\r\nhello?\r\n",
        )
        (reply,) = smtp_server.wait_for_messages(1, timeout=30)
        parsed = reply.message()
        assert parsed["In-Reply-To"] == "<q1@example.test>"
        assert "ANSWER to question" in reply.raw.decode()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "stopped" in stderr
        assert "Traceback" not in stderr


def test_run_serves_every_account_of_the_config(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    support, billing = dovecot.add_user(), dovecot.add_user()
    bot = tmp_path / "mybot.py"
    bot.write_text("async def handle(msg):\n    return 'ANSWER from ' + msg.account\n")
    shared = make_table(dovecot, support, smtp_server, tmp_path, initial_sync="unseen")
    for key in ("username", "password", "from_address"):
        del shared[key]
    path = write_config(tmp_path / "config.toml", shared)
    with path.open("a") as file:
        for name, user in (("support", support), ("billing", billing)):
            file.write(f"\n[channels_config.email.accounts.{name}]\n")
            for key, value in (("username", user.username), ("password", user.password),
                               ("from_address", user.address)):  # fmt: skip
                file.write(f"{key} = {json.dumps(value)}\n")
    with reaped(start_run(bot, path)) as proc:
        for user, mid in ((support, b"<s1@example.test>"), (billing, b"<b1@example.test>")):
            dovecot.deliver(
                user,
                b"From: alice@example.test\r\nSubject: q\r\nMessage-ID: " + mid + b"\r\n\r\nhi\r\n",
            )
        replies = smtp_server.wait_for_messages(2, timeout=30)
        answers = {r.message()["In-Reply-To"]: (r.mail_from, r.raw.decode()) for r in replies}
        assert answers["<s1@example.test>"][0] == support.address
        assert "ANSWER from support" in answers["<s1@example.test>"][1]
        assert answers["<b1@example.test>"][0] == billing.address
        assert "ANSWER from billing" in answers["<b1@example.test>"][1]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr


def test_config_table_helper_matches_fixture(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    # The TOML writer above must round-trip every value type the tests use.
    table = make_table(dovecot, account, smtp_server, tmp_path)
    path = write_config(tmp_path / "x.toml", table)
    loaded = tomllib.loads(path.read_text())["channels_config"]["email"]
    assert loaded == table


def test_sigterm_lets_a_running_handler_finish_and_send(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    bot = tmp_path / "slowbot.py"
    bot.write_text(
        "import asyncio, sys\n"
        "async def handle(msg):\n"
        "    print('HANDLER STARTED', file=sys.stderr, flush=True)\n"
        "    await asyncio.sleep(1.5)  # a slow agent, still thinking when SIGTERM comes\n"
        "    return 'slow answer'\n"
    )
    table = make_table(dovecot, account, smtp_server, tmp_path, initial_sync="unseen")
    with reaped(start_run(bot, write_config(tmp_path / "config.toml", table))) as proc:
        assert proc.stderr is not None
        dovecot.deliver(
            account,
            b"From: alice@example.test\r\nSubject: slow\r\nMessage-ID: <slow1@example.test>\r\n"
            b"\r\nthink hard\r\n",
        )
        read_until(proc.stderr, "HANDLER STARTED")
        proc.send_signal(signal.SIGTERM)
        (reply,) = smtp_server.wait_for_messages(1, timeout=30)
        assert "slow answer" in reply.raw.decode()
        assert reply.message()["In-Reply-To"] == "<slow1@example.test>"
        proc.communicate(timeout=30)
        assert proc.returncode == 0
