"""Self-tests of the real-server fixtures: prove they behave like the real thing.

Every wait here is bounded (socket timeouts, condition variables); nothing
sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aioimaplib
import aiosmtplib
import pytest

from tests.servers.certs import TestPKI
from tests.servers.dovecot import Account, DovecotError, DovecotServer, live_group_members
from tests.servers.postgres import PASSWORD as PG_PASSWORD
from tests.servers.postgres import PgBouncer, PostgresServer
from tests.servers.proxy import TcpProxy
from tests.servers.smtp import SmtpServer

TIMEOUT = 10.0


def make_message(subject: str, *, to: str = "someone@example.test", body: str = "hello") -> bytes:
    return (
        f"From: Sender <sender@example.test>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}-{time.monotonic_ns()}@example.test>\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"\r\n"
        f"{body}\r\n"
    ).encode()


class RawImap:
    """A minimal line-level IMAP client, for checks imaplib hides (IDLE, LOGIN reply)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.greeting = self.readline()

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = TIMEOUT) -> RawImap:
        return cls(socket.create_connection((host, port), timeout=timeout))

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def readline(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def command(self, tag: str, line: str) -> tuple[list[bytes], bytes]:
        """Send ``tag line``; return (untagged lines, tagged completion line)."""
        self.send(f"{tag} {line}")
        untagged: list[bytes] = []
        while True:
            resp = self.readline()
            if resp.startswith(tag.encode() + b" "):
                return untagged, resp
            untagged.append(resp)

    def close(self) -> None:
        self.sock.close()


def capabilities_in(line: bytes) -> set[str]:
    """Capabilities from ``* CAPABILITY ...`` or an ``[CAPABILITY ...]`` response code."""
    text = line.decode()
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", text) or re.match(r"\* CAPABILITY (.*)", text)
    assert m, f"no capability list in {text!r}"
    return {c.upper() for c in m.group(1).split()}


# --------------------------------------------------------------------------- Dovecot / TLS


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_imaps_login_verifies_certificate_against_test_ca(
    dovecot: DovecotServer, account: Account, host: str
) -> None:
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with imaplib.IMAP4_SSL(host, dovecot.imaps_port, ssl_context=ctx, timeout=TIMEOUT) as imap:
        sock = imap.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert imap.login(account.username, account.password)[0] == "OK"
        assert imap.select("INBOX") == ("OK", [b"0"])


def test_starttls_upgrade_then_login(dovecot: DovecotServer, account: Account) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl.create_default_context(cafile=str(dovecot.ca_file)))
        assert isinstance(imap.socket(), ssl.SSLSocket)
        assert "STARTTLS" not in imap.capabilities  # re-read after the upgrade
        assert imap.login(account.username, account.password)[0] == "OK"


def test_plain_login_without_tls_is_allowed_on_loopback(
    dovecot: DovecotServer, account: Account
) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        assert "LOGINDISABLED" not in imap.capabilities
        assert imap.login(account.username, account.password)[0] == "OK"


def test_certificate_from_another_ca_is_rejected(
    dovecot: DovecotServer, unrelated_ca_file: Path
) -> None:
    ctx = ssl.create_default_context(cafile=str(unrelated_ca_file))
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=ctx, timeout=TIMEOUT)
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        assert imap.command("a1", "STARTTLS")[1].startswith(b"a1 OK")
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(imap.sock, server_hostname=dovecot.host)
    finally:
        imap.close()


def test_certificate_is_not_valid_for_other_names(dovecot: DovecotServer) -> None:
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with (
        socket.create_connection((dovecot.host, dovecot.imaps_port), timeout=TIMEOUT) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|not valid"),
    ):
        ctx.wrap_socket(raw, server_hostname="imap.example.com")


def test_wrong_password_is_refused_promptly(dovecot: DovecotServer, account: Account) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        start = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(account.username, "not-the-password")
        # auth_failure_delay = 0: tests of error paths stay fast.
        assert time.monotonic() - start < 1.5


# --------------------------------------------------------------------------- Dovecot / mail


def test_lmtp_delivery_shows_up_over_imap_unread(dovecot: DovecotServer, account: Account) -> None:
    dovecot.deliver(account, make_message("first delivery", to=account.address))
    assert dovecot.list_uids(account, "INBOX") == [1]
    assert "\\Seen" not in dovecot.flags(account, "INBOX", 1)
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        imap.login(account.username, account.password)
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", "1", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        first = data[0]
        assert isinstance(first, tuple)
        msg = email.message_from_bytes(first[1], policy=email.policy.default)
        assert msg["Subject"] == "first delivery"
        assert msg["Delivered-To"] == account.address
        assert b"\\Seen" not in first[0]
    # BODY.PEEK must not have marked it read; a plain BODY[] fetch does.
    assert "\\Seen" not in dovecot.flags(account, "INBOX", 1)


def test_seen_flag_set_by_a_client_is_visible_to_the_fixture(
    dovecot: DovecotServer, account: Account
) -> None:
    dovecot.deliver(account, make_message("to be read"))
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        imap.login(account.username, account.password)
        imap.select("INBOX")
        imap.uid("FETCH", "1", "(BODY[])")
    assert "\\Seen" in dovecot.flags(account, "INBOX", 1)


def test_deliver_into_folder_creates_it(dovecot: DovecotServer, account: Account) -> None:
    dovecot.deliver(account, make_message("filed"), folder="Projects/Alpha")
    assert "Projects/Alpha" in dovecot.folders(account)
    assert dovecot.list_uids(account, "Projects/Alpha") == [1]
    assert dovecot.list_uids(account, "INBOX") == []
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        imap.login(account.username, account.password)
        typ, data = imap.select('"Projects/Alpha"', readonly=True)
        assert (typ, data) == ("OK", [b"1"])


def test_users_are_isolated_and_visible_without_restart(dovecot: DovecotServer) -> None:
    pid = dovecot.pid
    alice, bob = dovecot.add_user(), dovecot.add_user()  # same second, same file
    assert alice.username != bob.username
    dovecot.deliver(alice, make_message("for alice"))
    for acc, expected in ((alice, b"1"), (bob, b"0")):
        with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
            assert imap.login(acc.username, acc.password)[0] == "OK"
            assert imap.select("INBOX") == ("OK", [expected])
    assert dovecot.pid == pid
    with pytest.raises(ValueError):
        dovecot.add_user(alice.username)


def test_append_and_flags_via_doveadm(dovecot: DovecotServer, account: Account) -> None:
    dovecot.append(account, "Archive", make_message("archived"))
    dovecot.append(account, "Archive", make_message("archived 2"))
    assert dovecot.list_uids(account, "Archive") == [1, 2]
    assert dovecot.flags(account, "Archive", 2) == set()
    dovecot.set_flags(account, "Archive", 2, "\\Seen", "\\Flagged")
    assert dovecot.flags(account, "Archive", 2) == {"\\Seen", "\\Flagged"}
    dovecot.expunge(account, "Archive", 1)
    assert dovecot.list_uids(account, "Archive") == [2]
    with pytest.raises(DovecotError):
        dovecot.flags(account, "Archive", 1)


def test_recreate_folder_changes_uidvalidity(dovecot: DovecotServer, account: Account) -> None:
    dovecot.create_folder(account, "Work")
    dovecot.append(account, "Work", make_message("old"))
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=TIMEOUT) as imap:
        imap.login(account.username, account.password)

        def uidvalidity() -> int:
            typ, data = imap.status("Work", "(UIDVALIDITY MESSAGES)")
            assert typ == "OK"
            raw = data[0]
            assert isinstance(raw, bytes)
            m = re.search(rb"UIDVALIDITY (\d+)", raw)
            assert m
            return int(m.group(1))

        before = uidvalidity()
        assert before == dovecot.uidvalidity(account, "Work")
        after = dovecot.recreate_folder(account, "Work")
        assert after != before
        assert uidvalidity() == after
    assert dovecot.list_uids(account, "Work") == []
    dovecot.delete_folder(account, "Work")
    assert "Work" not in dovecot.folders(account)


def test_idle_reports_new_mail_within_a_second_or_two(
    dovecot: DovecotServer, account: Account
) -> None:
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        assert imap.command("a1", f"LOGIN {account.username} {account.password}")[1].startswith(
            b"a1 OK"
        )
        assert imap.command("a2", "SELECT INBOX")[1].startswith(b"a2 OK")
        imap.send("a3 IDLE")
        assert imap.readline().startswith(b"+ ")
        start = time.monotonic()
        dovecot.deliver(account, make_message("wake up"))
        imap.sock.settimeout(5.0)
        assert imap.readline() == b"* 1 EXISTS"
        # Dovecot batches change notifications for ~0.5 s; anything near the
        # 30 s default poll interval would mean IDLE is not really working.
        assert time.monotonic() - start < 3.0
        imap.send("DONE")
        while not (line := imap.readline()).startswith(b"a3 "):
            pass
        assert line.startswith(b"a3 OK")
    finally:
        imap.close()


def test_kick_disconnects_the_users_sessions(dovecot: DovecotServer, account: Account) -> None:
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        imap.command("a1", f"LOGIN {account.username} {account.password}")
        dovecot.kick(account)
        lines: list[bytes] = []
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                lines.append(imap.readline())
        assert any(line.startswith(b"* BYE") for line in lines)
    finally:
        imap.close()
    dovecot.kick("nobody-logged-in@example.test")  # no sessions: not an error


def test_restart_keeps_ports_users_and_mail(dovecot: DovecotServer, account: Account) -> None:
    ports = (dovecot.imap_port, dovecot.imaps_port, dovecot.lmtp_port)
    dovecot.deliver(account, make_message("survives restart"))
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        imap.command("a1", f"LOGIN {account.username} {account.password}")
        old_pid = dovecot.pid
        dovecot.restart()
        assert dovecot.pid != old_pid
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                imap.readline()
    finally:
        imap.close()
    assert (dovecot.imap_port, dovecot.imaps_port, dovecot.lmtp_port) == ports
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=ctx) as imap2:
        imap2.login(account.username, account.password)
        assert imap2.select("INBOX") == ("OK", [b"1"])


def test_crash_stop_then_start(dovecot: DovecotServer, account: Account) -> None:
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        imap.command("a1", f"LOGIN {account.username} {account.password}")
        dovecot.stop(graceful=False)
        assert not dovecot.running
        lines: list[bytes] = []
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                lines.append(imap.readline())
        assert not any(line.startswith(b"* BYE") for line in lines)  # no goodbye on a crash
        with pytest.raises(OSError):
            socket.create_connection((dovecot.host, dovecot.imap_port), timeout=TIMEOUT).close()
    finally:
        imap.close()
        dovecot.start()
    dovecot.deliver(account, make_message("after crash"))
    assert dovecot.list_uids(account) == [1]


def test_noidle_variant_does_not_advertise_idle(
    dovecot_noidle: DovecotServer, noidle_account: Account
) -> None:
    acc = noidle_account
    # Pre-login: neither in the greeting nor in a CAPABILITY response.
    imap = RawImap.connect(dovecot_noidle.host, dovecot_noidle.imap_port)
    try:
        greeting_caps = capabilities_in(imap.greeting)
        assert "IDLE" not in greeting_caps
        assert {"IMAP4REV1", "STARTTLS", "AUTH=PLAIN"} <= greeting_caps
        untagged, _ = imap.command("a1", "CAPABILITY")
        assert "IDLE" not in capabilities_in(untagged[0])
    finally:
        imap.close()
    # Post-login: the LOGIN completion carries the new list, and so does CAPABILITY.
    imap = RawImap.connect(dovecot_noidle.host, dovecot_noidle.imap_port)
    try:
        _, done = imap.command("a1", f"LOGIN {acc.username} {acc.password}")
        assert done.startswith(b"a1 OK")
        login_caps = capabilities_in(done)
        assert "IDLE" not in login_caps
        assert {"IMAP4REV1", "UIDPLUS", "MOVE", "CONDSTORE"} <= login_caps  # rest intact
        untagged, _ = imap.command("a2", "CAPABILITY")
        assert "IDLE" not in capabilities_in(untagged[0])
    finally:
        imap.close()


def test_idle_variant_advertises_idle_everywhere(dovecot: DovecotServer, account: Account) -> None:
    imap = RawImap.connect(dovecot.host, dovecot.imap_port)
    try:
        assert "IDLE" in capabilities_in(imap.greeting)
        _, done = imap.command("a1", f"LOGIN {account.username} {account.password}")
        assert "IDLE" in capabilities_in(done)
    finally:
        imap.close()


def test_startup_failure_is_reported_with_dovecot_output(pki: TestPKI) -> None:
    server = DovecotServer(pki=pki, extra_config="no_such_setting_xyz = 1\n")
    try:
        with pytest.raises(DovecotError, match="no_such_setting_xyz"):
            server.start()
        assert not server.running
    finally:
        server.close()


def test_close_leaves_no_process_or_port_behind(pki: TestPKI) -> None:
    server = DovecotServer(pki=pki)
    server.start()
    pid = server.pid
    assert pid is not None
    server.close()
    assert live_group_members(pid) == {}
    for port in (server.imap_port, server.imaps_port, server.lmtp_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((server.host, port), timeout=TIMEOUT).close()
    assert not server.root.exists()


def test_dovecot_dies_with_a_killed_test_process(pki: TestPKI) -> None:
    # A CI timeout kills pytest with no chance to run teardown or atexit.
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from tests.servers.certs import TestPKI\n"
        "from tests.servers.dovecot import DovecotServer\n"
        "p = Path(sys.argv[1])\n"
        "pki = TestPKI(p / 'ca.pem', p / 'server-cert.pem', p / 'server-key.pem')\n"
        "s = DovecotServer(pki=pki)\n"
        "s.start()\n"
        "print(s.pid, s.root, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    root_dir = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", script, str(pki.ca_file.parent)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root_dir,
        env={**os.environ, "PYTHONPATH": str(root_dir)},
        check=False,
    )
    assert proc.returncode == -9, proc.stderr
    pid_text, root = proc.stdout.split()
    deadline = time.monotonic() + 10
    while (live_group_members(int(pid_text)) or Path(root).exists()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert live_group_members(int(pid_text)) == {}
    assert not Path(root).exists()


@pytest.mark.asyncio
async def test_async_imaps_idle_with_adeliver(dovecot: DovecotServer, account: Account) -> None:
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = aioimaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=ctx)
    await client.wait_hello_from_server()
    assert (await client.login(account.username, account.password)).result == "OK"
    assert (await client.select("INBOX")).result == "OK"
    idle = await client.idle_start(timeout=TIMEOUT)
    await dovecot.adeliver(account, make_message("async"))
    push = await asyncio.wait_for(client.wait_server_push(), TIMEOUT)
    assert b"1 EXISTS" in push or "1 EXISTS" in str(push)
    client.idle_done()
    assert (await asyncio.wait_for(idle, TIMEOUT)).result == "OK"
    await client.logout()


# --------------------------------------------------------------------------- SMTP


def test_smtp_implicit_tls_with_auth(smtp_server: SmtpServer) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    raw = make_message("via smtps", to="rcpt@example.test")
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        client.login(smtp_server.username, smtp_server.password)
        assert client.sendmail("sender@example.test", ["rcpt@example.test"], raw) == {}
    [msg] = smtp_server.wait_for_messages(1, timeout=TIMEOUT)
    assert msg.mail_from == "sender@example.test"
    assert msg.rcpt_tos == ("rcpt@example.test",)
    assert msg.raw == raw
    assert msg.auth_login == smtp_server.username
    assert (msg.listener, msg.tls) == ("tls", True)
    assert msg.message()["Subject"] == "via smtps"


def test_smtp_starttls_required_before_auth_and_mail(smtp_server: SmtpServer) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    with smtplib.SMTP(smtp_server.host, smtp_server.starttls_port, timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # no AUTH over cleartext
        assert client.mail("sender@example.test")[0] == 530
        client.starttls(context=ctx)
        client.ehlo()
        assert client.has_extn("auth")
        client.login(smtp_server.username, smtp_server.password)
        client.sendmail("sender@example.test", ["rcpt@example.test"], make_message("starttls"))
    [msg] = smtp_server.wait_for_messages(1, timeout=TIMEOUT)
    assert (msg.listener, msg.tls, msg.auth_login) == ("starttls", True, smtp_server.username)


def test_smtp_starttls_with_wrong_ca_fails(
    smtp_server: SmtpServer, unrelated_ca_file: Path
) -> None:
    ctx = ssl.create_default_context(cafile=str(unrelated_ca_file))
    with (
        smtplib.SMTP(smtp_server.host, smtp_server.starttls_port, timeout=TIMEOUT) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.starttls(context=ctx)


def test_smtp_auth_failure_is_535_not_a_hang(smtp_server: SmtpServer) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        start = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(smtp_server.username, "wrong")
        assert info.value.smtp_code == 535
        assert time.monotonic() - start < 2.0
        # Not authenticated: sending is refused.
        assert client.mail("sender@example.test")[0] == 530
    attempts = smtp_server.wait_for_auth_attempts(1, timeout=TIMEOUT)
    assert attempts and not any(a.success for a in attempts)
    assert smtp_server.messages == []


def test_smtp_scripted_temporary_failures_then_success(smtp_server: SmtpServer) -> None:
    smtp_server.script_rcpt(["451 4.3.0 try later", "451 4.3.0 try later"])
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    raw = make_message("retry me")
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        client.login(smtp_server.username, smtp_server.password)
        for _ in range(2):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                client.sendmail("sender@example.test", ["rcpt@example.test"], raw)
            assert info.value.recipients["rcpt@example.test"][0] == 451
        assert smtp_server.messages == []
        assert client.sendmail("sender@example.test", ["rcpt@example.test"], raw) == {}
        smtp_server.script_data(["452 4.3.1 out of storage"])
        with pytest.raises(smtplib.SMTPDataError) as data_info:
            client.sendmail("sender@example.test", ["rcpt@example.test"], raw)
        assert data_info.value.smtp_code == 452
    assert len(smtp_server.wait_for_messages(1, timeout=TIMEOUT)) == 1
    assert smtp_server.pending_script("RCPT") == []


def test_smtp_permanent_rejection_of_one_recipient(smtp_server: SmtpServer) -> None:
    smtp_server.reject_recipient("ghost@example.test")
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        client.login(smtp_server.username, smtp_server.password)
        refused = client.sendmail(
            "sender@example.test", ["ok@example.test", "Ghost@example.test"], make_message("x")
        )
        assert refused == {"Ghost@example.test": (550, b"5.1.1 no such user")}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("sender@example.test", ["ghost@example.test"], make_message("y"))
    [msg] = smtp_server.wait_for_messages(1, timeout=TIMEOUT)
    assert msg.rcpt_tos == ("ok@example.test",)


def test_smtp_drop_after_data_records_message_but_client_sees_no_reply(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.drop_after_data()
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        client.login(smtp_server.username, smtp_server.password)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("sender@example.test", ["rcpt@example.test"], make_message("lost"))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.quit()
    assert len(smtp_server.wait_for_messages(1, timeout=TIMEOUT)) == 1
    # Only the next message was affected.
    with smtplib.SMTP_SSL(
        smtp_server.host, smtp_server.tls_port, context=ctx, timeout=TIMEOUT
    ) as client:
        client.login(smtp_server.username, smtp_server.password)
        client.sendmail("sender@example.test", ["rcpt@example.test"], make_message("fine"))
    assert len(smtp_server.wait_for_messages(2, timeout=TIMEOUT)) == 2


def test_smtp_wait_for_messages_times_out(smtp_server: SmtpServer) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        smtp_server.wait_for_messages(1, timeout=0.2)
    assert time.monotonic() - start < 2.0


def test_smtp_auth_over_cleartext_can_be_allowed(pki: TestPKI) -> None:
    with SmtpServer(pki, auth_require_tls=False, require_starttls=False) as server:
        with smtplib.SMTP(server.host, server.starttls_port, timeout=TIMEOUT) as client:
            client.login(server.username, server.password)
            client.sendmail("sender@example.test", ["r@example.test"], make_message("clear"))
        [msg] = server.wait_for_messages(1, timeout=TIMEOUT)
        assert (msg.tls, msg.auth_login) == (False, server.username)


def test_smtp_relay_delivers_into_dovecot(
    smtp_relay: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_relay.ca_file))
    with smtplib.SMTP_SSL(smtp_relay.host, smtp_relay.tls_port, context=ctx) as client:
        client.login(smtp_relay.username, smtp_relay.password)
        client.sendmail(
            "sender@example.test",
            [account.address, "outside@elsewhere.test"],
            make_message("relayed", to=account.address),
        )
    smtp_relay.wait_for_messages(1, timeout=TIMEOUT)
    assert dovecot.list_uids(account) == [1]


@pytest.mark.asyncio
async def test_smtp_fixture_with_aiosmtplib(smtp_server: SmtpServer) -> None:
    ctx = ssl.create_default_context(cafile=str(smtp_server.ca_file))
    errors, _ = await aiosmtplib.send(
        make_message("async send"),
        sender="sender@example.test",
        recipients=["rcpt@example.test"],
        hostname=smtp_server.host,
        port=smtp_server.starttls_port,
        start_tls=True,
        tls_context=ctx,
        username=smtp_server.username,
        password=smtp_server.password,
        timeout=TIMEOUT,
    )
    assert errors == {}
    [msg] = await smtp_server.await_messages(1, timeout=TIMEOUT)
    assert msg.message()["Subject"] == "async send"


# --------------------------------------------------------------------------- proxy


def test_proxy_forwards_tls_and_counts_connections(
    dovecot: DovecotServer, account: Account, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy(dovecot.host, dovecot.imaps_port)
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    # The certificate is for 127.0.0.1, which is also the proxy's address.
    with imaplib.IMAP4_SSL(p.host, p.port, ssl_context=ctx, timeout=TIMEOUT) as imap:
        assert imap.login(account.username, account.password)[0] == "OK"
    assert p.wait_for_connections(1, timeout=TIMEOUT) == 1


def test_proxy_freeze_makes_reads_time_out_without_closing(
    dovecot: DovecotServer, account: Account, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy(dovecot.host, dovecot.imap_port)
    imap = RawImap.connect(p.host, p.port)
    try:
        login = imap.command("a1", f"LOGIN {account.username} {account.password}")[1]
        assert login.startswith(b"a1 OK")
        assert imap.command("a2", "SELECT INBOX")[1].startswith(b"a2 OK")

        # Client -> server direction: a command gets no answer, and no EOF either.
        p.freeze()
        assert p.frozen
        imap.send("a3 NOOP")
        imap.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            imap.readline()
        assert p.active_connections == 1
        p.thaw()
        imap.sock.settimeout(TIMEOUT)
        while not (line := imap.readline()).startswith(b"a3 "):
            pass
        assert line.startswith(b"a3 OK")  # held back, then delivered

        # Server -> client direction: an IDLE push is held back too.
        imap.send("a4 IDLE")
        assert imap.readline().startswith(b"+ ")
        p.freeze()
        dovecot.deliver(account, make_message("while frozen"))
        imap.sock.settimeout(1.5)  # > Dovecot's ~0.5 s notification delay
        with pytest.raises(TimeoutError):
            imap.readline()
        p.thaw()
        imap.sock.settimeout(TIMEOUT)
        assert imap.readline() == b"* 1 EXISTS"
        assert p.connections_accepted == 1  # the very same connection throughout
    finally:
        imap.close()


def test_proxy_cut_closes_connections_but_keeps_listening(
    dovecot: DovecotServer, account: Account, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy(dovecot.host, dovecot.imap_port)
    imap = RawImap.connect(p.host, p.port)
    try:
        p.cut()
        with pytest.raises((EOFError, ConnectionResetError)):
            imap.readline()
    finally:
        imap.close()
    with imaplib.IMAP4(p.host, p.port, timeout=TIMEOUT) as again:
        assert again.login(account.username, account.password)[0] == "OK"
    assert p.connections_accepted == 2


def test_postgres_cluster_takes_password_logins_and_gives_each_test_a_database(
    postgres: PostgresServer, pg_url: str
) -> None:
    import psycopg

    with psycopg.connect(pg_url, connect_timeout=10) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname='public'"
        ).fetchone() == (0,)
    wrong = pg_url.replace(f":{PG_PASSWORD}@", ":wrong@")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(wrong, connect_timeout=10).close()


def test_pgbouncer_pools_per_transaction(pgbouncer: PgBouncer, postgres: PostgresServer) -> None:
    """Session state does not survive a transaction there: what replicas must live with."""
    import psycopg

    db = postgres.new_database()
    with (
        psycopg.connect(
            pgbouncer.url(db), connect_timeout=10, autocommit=True, prepare_threshold=None
        ) as a,
        psycopg.connect(
            pgbouncer.url(db), connect_timeout=10, autocommit=True, prepare_threshold=None
        ) as b,
    ):
        a.execute("SELECT pg_advisory_lock(42)")
        # Through a transaction pool the lock lands on a server session that another
        # client may be handed next: b can see it held although b never asked for it,
        # or a's own next statement runs on a session that does not hold it.
        a_pid = {a.execute("SELECT pg_backend_pid()").fetchone() for _ in range(5)}
        b_pid = {b.execute("SELECT pg_backend_pid()").fetchone() for _ in range(5)}
        assert a_pid & b_pid, "two clients should share server sessions in transaction mode"
        a.execute("SELECT pg_advisory_unlock_all()")
