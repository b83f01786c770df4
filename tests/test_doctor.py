"""The doctor against the real fixture servers: each broken setting is named, with its fix."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._mail.authresults import authserv_ids
from prx_channel_email.config import config_from_table
from prx_channel_email.doctor import DoctorReport, doctor, run_doctor
from tests.config_builder import config_table
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.dovecot import free_ports as _free_ports
from tests.servers.smtp import SmtpServer

BOUND = 60.0  # generous upper bound for a whole run; the doctor's own budget is 10 s a check


def make_table(
    dovecot: DovecotServer, account: Account, smtp: SmtpServer, tmp_path: Path, **overrides: Any
) -> dict[str, Any]:
    """A TOML-able table (plain strings for paths) on the fixture servers."""
    table = config_table(
        str(tmp_path / "state"),
        dovecot=dovecot,
        account=account,
        smtp=smtp,
        host="localhost",
        imap_security="tls",
        from_address=account.address,
        allowed_senders=["alice@example.test"],
    )
    table["ca_file"] = str(table["ca_file"])
    table.update(overrides)
    return table


async def diagnose(table: dict[str, Any], **kw: Any) -> DoctorReport:
    return await asyncio.wait_for(run_doctor(config_from_table(table), **kw), BOUND)


def problems(report: DoctorReport) -> list[dict[str, Any]]:
    """The checks that did not pass, for assertion messages."""
    return [c.to_dict() for c in report.checks if c.status != "pass"]


def status_of(report: DoctorReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def failed_one(report: DoctorReport, name: str) -> str:
    """Assert that ``name`` is the first failure and return its fix."""
    assert report.exit_code == 1, problems(report)
    first = report.failed[0]
    assert first.name == name, problems(report)
    assert first.fix, first
    return first.fix


@pytest.fixture
def base(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> dict[str, Any]:
    return make_table(dovecot, account, smtp_server, tmp_path)


SIGNED = (
    b"Authentication-Results: mx.example.test; dmarc=pass header.from=example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bot@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <signed-1@example.test>\r\n"
    b"\r\n"
    b"hi\r\n"
)


async def test_good_config_passes(
    base: dict[str, Any], dovecot: DovecotServer, account: Account, smtp_server: SmtpServer
) -> None:
    await asyncio.to_thread(dovecot.deliver, account, SIGNED)
    base["trusted_authserv_ids"] = ["mx.example.test"]
    report = await diagnose(base)
    statuses = status_of(report)
    assert report.exit_code == 0, problems(report)
    for name in (
        "config",
        "imap dns",
        "imap tcp",
        "imap tls",
        "imap greeting",
        "imap login",
        "imap idle",
        "imap folder",
        "imap folders",
        "sender verification",
        "smtp dns",
        "smtp tcp",
        "smtp tls",
        "smtp ehlo",
        "smtp auth",
        "state dir",
        "attachments dir",
        "allowed senders",
    ):
        assert statuses[name] == "pass", (name, problems(report))
    assert "expires in" in report.get("imap tls").detail  # type: ignore[union-attr]
    assert "mx.example.test" in report.get("sender verification").detail  # type: ignore[union-attr]
    # Nothing is sent unless asked.
    assert smtp_server.messages == []


async def test_starttls_on_both_sides_passes(
    base: dict[str, Any], dovecot: DovecotServer, smtp_server: SmtpServer
) -> None:
    base.update(
        imap_port=dovecot.imap_port,
        imap_security="starttls",
        smtp_port=smtp_server.starttls_port,
        smtp_security="starttls",
    )
    report = await diagnose(base)
    assert report.exit_code == 0, problems(report)
    assert status_of(report)["imap tls"] == "pass"
    assert status_of(report)["smtp tls"] == "pass"
    assert "STARTTLS" in report.get("smtp ehlo").detail  # type: ignore[union-attr]


async def test_wrong_password_names_login_and_app_passwords(base: dict[str, Any]) -> None:
    base["password"] = "not-the-password"
    report = await diagnose(base)
    fix = failed_one(report, "imap login")
    assert "app password" in fix
    assert "not-the-password" not in str(problems(report))  # never a secret
    assert status_of(report)["imap folder"] == "skip"


async def test_gmail_host_gets_gmail_hint(base: dict[str, Any]) -> None:
    from prx_channel_email.doctor import _login_fix

    fix = _login_fix(config_from_table(base), "imap.gmail.com", 993, "password")
    assert "IMAP enabled" in fix and "app password" in fix


async def test_tls_on_a_plaintext_port_says_which_port_to_use(
    base: dict[str, Any], dovecot: DovecotServer
) -> None:
    base["imap_port"] = dovecot.imap_port  # the STARTTLS port, while imap_security = "tls"
    report = await diagnose(base)
    fix = failed_one(report, "imap tls")
    assert "993" in fix and "143" in fix


async def test_closed_port_fails_tcp(base: dict[str, Any]) -> None:
    (port,) = _free_ports(1)
    base["imap_port"] = port
    report = await diagnose(base)
    failed_one(report, "imap tcp")
    assert "refused" in report.failed[0].detail


async def test_wrong_smtp_port_mode(base: dict[str, Any], smtp_server: SmtpServer) -> None:
    base["smtp_port"] = smtp_server.starttls_port  # plaintext port, implicit TLS configured
    report = await diagnose(base)
    fix = failed_one(report, "smtp tls")
    assert "465" in fix and "587" in fix


async def test_unknown_host_fails_dns_without_network(base: dict[str, Any]) -> None:
    base["imap_host"] = "imap.nowhere.invalid"
    base["smtp_host"] = "smtp.nowhere.invalid"
    report = await diagnose(base, check_timeout=2.0)
    fix = failed_one(report, "imap dns")
    assert "imap_host" in fix
    assert status_of(report)["smtp dns"] == "fail"
    assert status_of(report)["imap tcp"] == "skip"


async def test_missing_folder_lists_existing_ones(
    base: dict[str, Any], dovecot: DovecotServer, account: Account
) -> None:
    await asyncio.to_thread(dovecot.deliver, account, SIGNED, "Archive")
    base["imap_folder"] = "Tickets"
    report = await diagnose(base)
    fix = failed_one(report, "imap folder")
    assert "INBOX" in fix and "Archive" in fix
    assert "Tickets" in report.failed[0].detail


async def test_untrusted_certificate_points_to_ca_file(base: dict[str, Any]) -> None:
    del base["ca_file"]
    report = await diagnose(base)
    fix = failed_one(report, "imap tls")
    assert "ca_file" in fix
    assert status_of(report)["smtp tls"] == "fail"


async def test_smtp_refusing_auth(base: dict[str, Any]) -> None:
    base["smtp_password"] = "wrong-smtp-password"
    report = await diagnose(base)
    fix = failed_one(report, "smtp auth")
    assert "smtp_password" in fix
    assert "535" in report.failed[0].detail
    assert status_of(report)["imap login"] == "pass"


async def test_server_without_idle_warns_about_polling(
    dovecot_noidle: DovecotServer, noidle_account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    table = make_table(dovecot_noidle, noidle_account, smtp_server, tmp_path)
    report = await diagnose(table)
    assert report.exit_code == 0, problems(report)
    idle = report.get("imap idle")
    assert idle is not None and idle.status == "warn"
    assert "poll" in (idle.fix or "")


@pytest.mark.parametrize(("senders", "word"), [([], "nobody"), (["*"], "everybody")])
async def test_allowed_senders_warnings(
    base: dict[str, Any], senders: list[str], word: str
) -> None:
    base["allowed_senders"] = senders
    report = await diagnose(base)
    check = report.get("allowed senders")
    assert check is not None and check.status == "warn" and word in check.detail
    assert report.exit_code == 0


async def test_unwritable_state_dir_fails(base: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    base["state_dir"] = str(blocker / "state")
    report = await diagnose(base)
    fix = failed_one(report, "state dir")
    assert "state_dir" in fix


async def test_untrusted_authserv_id_is_reported(
    base: dict[str, Any], dovecot: DovecotServer, account: Account
) -> None:
    await asyncio.to_thread(dovecot.deliver, account, SIGNED)
    report = await diagnose(base)
    check = report.get("sender verification")
    assert check is not None and check.status == "warn"
    assert "trusted_authserv_ids = ['mx.example.test']" in (check.fix or "")


MICROSOFT = (
    b"Authentication-Results: spf=pass (sender IP is 192.0.2.7) smtp.mailfrom=example.test;"
    b" dkim=pass (signature was verified) header.d=example.test;dmarc=pass action=none"
    b" header.from=example.test;compauth=pass reason=100\r\n"
    b"Authentication-Results: mx.example.test; dmarc=pass header.from=example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bot@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <ms-1@example.test>\r\n"
    b"\r\n"
    b"hi\r\n"
)


async def test_enforce_with_nothing_trusted_fails_with_the_line_to_paste(
    base: dict[str, Any], dovecot: DovecotServer, account: Account
) -> None:
    # The newest mail's provider field is Microsoft's (no authserv-id); the
    # "mx.example.test" field below it was planted and must not be proposed.
    await asyncio.to_thread(dovecot.deliver, account, SIGNED)
    await asyncio.to_thread(dovecot.deliver, account, MICROSOFT)
    base["sender_auth"] = "enforce"
    fix = failed_one(await diagnose(base), "sender verification")
    assert fix.endswith("paste: trusted_authserv_ids = ['@none']"), fix
    # Pasting that line makes the check pass.
    base["trusted_authserv_ids"] = ["@none"]
    report = await diagnose(base)
    assert report.exit_code == 0, problems(report)
    assert status_of(report)["sender verification"] == "pass"


async def test_send_test_sends_exactly_one_message(
    base: dict[str, Any], smtp_server: SmtpServer
) -> None:
    report = await diagnose(base, send_test="someone@example.test")
    assert report.exit_code == 0, problems(report)
    assert status_of(report)["send test"] == "pass"
    (received,) = await smtp_server.await_messages(1)
    assert received.rcpt_tos == ("someone@example.test",)
    assert received.message()["Subject"].startswith("prx-email doctor")


@pytest.mark.parametrize("address", ["a@x.example, b@y.example", "a@x.example\r\nBcc: c@z"])
async def test_send_test_to_anything_but_one_address_sends_nothing(
    base: dict[str, Any], smtp_server: SmtpServer, address: str
) -> None:
    report = await diagnose(base, send_test=address)
    assert report.exit_code == 1
    assert status_of(report)["send test"] == "fail"
    assert status_of(report)["smtp auth"] == "pass"  # the rest of the report is still there
    smtp_server.assert_no_more_messages(0, within=0.5)


async def test_invalid_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[channels_config.email]\nimap_host = "x"\nimap_port = "many"\n')
    report = await doctor(path)
    assert report.exit_code == 2
    assert report.config_invalid
    detail = report.checks[0].detail
    assert "imap_port" in detail and "smtp_host" in detail


def test_authserv_id_parsing() -> None:
    assert authserv_ids(
        ["mx.google.com; dkim=pass", "spf=pass smtp.mailfrom=x", "mx1.example.org 1; dmarc=pass"]
    ) == ["mx.google.com", "mx1.example.org"]


async def test_silent_server_fails_the_step_that_hangs_and_stays_bounded(
    base: dict[str, Any], dovecot: DovecotServer, proxy: Any
) -> None:
    dead = proxy("127.0.0.1", dovecot.imaps_port)
    dead.freeze()  # TCP connects, then not a byte comes back (a dead NAT path)
    base["imap_port"] = dead.address[1]  # imap_host stays "localhost", the certificate's name
    report = await diagnose(base, check_timeout=1.0)
    failed_one(report, "imap tls")
    assert "no answer within 1 s" in report.failed[0].detail
    assert status_of(report)["smtp auth"] == "pass"  # the other chain is unaffected
