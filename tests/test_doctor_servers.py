"""The doctor against servers that are not Dovecot: folder names, push, goodbyes.

Through :class:`~tests.servers.quirk_proxy.QuirkProxy` (Courier's behaviour) and
Dovecot with Courier's folder layout (``INBOX.`` prefix, ``.`` delimiter).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prx_channel_email.doctor import DoctorReport
from tests.integration_helpers import wait_until
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.quirk_proxy import QuirkProxy
from tests.servers.smtp import SmtpServer
from tests.test_doctor import diagnose, make_table, problems

COURIER = "Courier-IMAP ready. Copyright 1998-2018 Double Precision, Inc."


def _table(
    server: DovecotServer,
    account: Account,
    smtp: SmtpServer,
    tmp_path: Path,
    proxy: QuirkProxy,
    **overrides: Any,
) -> dict[str, Any]:
    table = make_table(server, account, smtp, tmp_path, imap_port=proxy.port, **overrides)
    table["imap_host"] = "localhost"
    return table


def _check(report: DoctorReport, name: str) -> tuple[str, str, str]:
    check = report.get(name)
    assert check is not None, problems(report)
    return check.status, check.detail, check.fix or ""


async def test_the_doctor_says_goodbye_to_both_servers(
    dovecot: DovecotServer,
    account: Account,
    smtp_server: SmtpServer,
    tmp_path: Path,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    """Every probe ends with LOGOUT / QUIT: Postfix logged "lost connection after
    STARTTLS" on every doctor run."""
    proxy = quirk_proxy(dovecot)
    table = _table(dovecot, account, smtp_server, tmp_path, proxy, smtp_security="starttls")
    table["smtp_port"] = smtp_server.starttls_port
    report = await diagnose(table)
    assert report.exit_code == 0, problems(report)
    ended = smtp_server.wait_for_ended_connections(2)
    assert ended == [("starttls", True), ("starttls", True)]
    await wait_until(lambda: len(proxy.finished_sessions()) == len(proxy.sessions) == 2, 10)
    for session in proxy.sessions:
        assert session.names[-1] == "LOGOUT", session.commands


async def test_folders_are_named_by_the_server_and_checked(
    dovecot_courier: DovecotServer,
    smtp_server: SmtpServer,
    tmp_path: Path,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    server = dovecot_courier
    account = server.add_user()
    for folder in ("INBOX.Work", "INBOX.Processed"):
        server.create_folder(account, folder)
    proxy = quirk_proxy(server)
    table = _table(
        server, account, smtp_server, tmp_path, proxy,
        imap_folder="Work", move_to_folder="Processed", sent_folder="Sent",
    )  # fmt: skip
    report = await diagnose(table)
    status, detail, _ = _check(report, "imap folder")
    assert status == "pass" and "'INBOX.Work'" in detail
    status, detail, fix = _check(report, "imap folders")
    assert status == "fail"
    assert "move_to_folder 'Processed' is 'INBOX.Processed'" in detail
    assert "sent_folder 'Sent' does not exist" in detail
    assert 'create the folder "INBOX.Sent"' in fix

    # A name that exists under another spelling: the exact one is offered.
    table.update(move_to_folder="processed", sent_folder=None)
    report = await diagnose(table)
    status, detail, fix = _check(report, "imap folders")
    assert status == "fail" and "move_to_folder 'processed' does not exist" in detail
    assert 'set move_to_folder = "INBOX.Processed"' in fix

    table.update(imap_folder="Wrok", move_to_folder=None)
    report = await diagnose(table)
    status, detail, fix = _check(report, "imap folder")
    assert status == "fail" and "INBOX.Work" in fix


async def test_push_test_times_a_real_push_and_deletes_its_message(
    dovecot: DovecotServer,
    account: Account,
    smtp_server: SmtpServer,
    tmp_path: Path,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    proxy = quirk_proxy(dovecot)
    report = await diagnose(_table(dovecot, account, smtp_server, tmp_path, proxy), push_test=True)
    status, detail, _ = _check(report, "imap idle")
    assert status == "pass" and detail.startswith("push works ("), detail
    assert dovecot.list_uids(account) == []  # the test message is gone again


async def test_push_test_names_the_server_setting_when_idle_is_silent(
    dovecot: DovecotServer,
    account: Account,
    smtp_server: SmtpServer,
    tmp_path: Path,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    proxy = quirk_proxy(dovecot, {"silent_idle"}, greeting=COURIER)
    table = _table(dovecot, account, smtp_server, tmp_path, proxy)
    report = await diagnose(table, push_test=True, check_timeout=2.0)
    status, detail, fix = _check(report, "imap idle")
    assert status == "warn" and "advertises IDLE" in detail, detail
    assert "IMAP_ENHANCEDIDLE=1" in fix
    assert report.exit_code == 0, problems(report)
    assert dovecot.list_uids(account) == []


async def test_without_push_test_idle_is_not_promised(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    report = await diagnose(make_table(dovecot, account, smtp_server, tmp_path))
    status, detail, _ = _check(report, "imap idle")
    assert status == "pass" and "pushed at once" not in detail.replace("really pushed", "")
    assert "--push-test" in detail
