"""The demo a new user runs first: sandbox server, real EmailChannel, a threaded reply."""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import re
import signal
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import aioimaplib
from rich.console import Console
from typer.testing import CliRunner

from prx_channel_email._demo.sandbox import MailSandbox
from prx_channel_email.cli import app, run_demo
from tests.operator_helpers import read_until, reaped, subprocess_env

BOUND = 90.0


def test_demo_command_shows_message_and_threaded_reply(tmp_path: Path) -> None:
    # No config anywhere: run from an empty directory.
    result = subprocess.run(
        [sys.executable, "-m", "prx_channel_email.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "normalized incoming message" in out
    assert "sender_verified" in out and "thread_ts" in out
    assert "Hi! Can you hear me?" in out
    assert "Re: Hello bot" in out
    (in_reply_to,) = re.findall(r"In-Reply-To\s*│\s*(<[^>]+>)", out)
    ids = re.findall(r"\bid\s*│\s*(<[^>]+>)", out)
    assert ids and ids[0] == in_reply_to  # the reply threads onto the user's mail
    assert "Traceback" not in result.stderr


async def test_run_demo_in_process(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    code = await asyncio.wait_for(run_demo(console=console, state_dir=tmp_path), BOUND)
    assert code == 0
    text = console.export_text()
    assert "You wrote:" in text and "the echo bot answered in the same thread" in text


def test_keep_running_prints_working_instructions(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "prx_channel_email.cli", "demo", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    with reaped(proc):
        assert proc.stdout is not None
        text = read_until(proc.stdout, "Ctrl-C stops")
        imap_port = int(re.search(r"IMAP\s+127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        user, password = re.search(r"user\s+(\S+)\s+password\s+(\S+)", text).groups()  # type: ignore[union-attr]
        (one_liner,) = [
            ln.strip() for ln in text.splitlines() if ln.strip().startswith("python -c")
        ]
        config_file = re.search(r"doctor --config (\S+?)\)", text).group(1)  # type: ignore[union-attr]

        # Follow the printed instructions: paste the command, read the answer over IMAP.
        sent = subprocess.run(["bash", "-c", one_liner], capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        reply = _wait_for_reply(imap_port, user, password, "Re: again")
        assert "hello once more" in reply.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        # ... and check the printed settings with the doctor.
        doctor = CliRunner().invoke(app, ["doctor", "--config", config_file])
        assert doctor.exit_code == 0, doctor.output

        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def _wait_for_reply(port: int, user: str, password: str, subject: str) -> EmailMessage:
    """IDLE on the user's inbox until a mail with ``subject`` is there (bounded)."""

    async def run() -> EmailMessage:
        client = aioimaplib.IMAP4("127.0.0.1", port, timeout=10)
        await client.wait_hello_from_server()
        await client.login(user, password)
        await client.select("INBOX")
        try:
            while True:
                found = await _find(client, subject)
                if found is not None:
                    return found
                idle = await client.idle_start(timeout=20)
                await client.wait_server_push(timeout=20)
                client.idle_done()
                await asyncio.wait_for(idle, 10)
        finally:
            await client.logout()

    return asyncio.run(asyncio.wait_for(run(), 60))


async def _find(client: aioimaplib.IMAP4, subject: str) -> EmailMessage | None:
    res = await client.search(f'HEADER Subject "{subject}"')
    nums = res.lines[0].split() if res.lines and res.lines[0] else []
    if not nums:
        return None
    fetched = await client.fetch(nums[-1].decode(), "(BODY.PEEK[])")
    raw = next(line for line in fetched.lines if isinstance(line, bytearray))
    return email.message_from_bytes(bytes(raw), policy=email.policy.default)


async def test_sandbox_with_a_plain_imap_client() -> None:
    """The sandbox on its own: SMTP delivery is pushed to an IDLE client, strangers refused."""
    async with MailSandbox() as sandbox:
        client = aioimaplib.IMAP4(sandbox.host, sandbox.imap_port, timeout=10)
        await client.wait_hello_from_server()
        assert (await client.login(sandbox.bot.address, sandbox.bot.password)).result == "OK"
        await client.select("INBOX")
        idle = await client.idle_start(timeout=20)
        await sandbox.send_as_user("hi", "hello")
        push = await client.wait_server_push(timeout=10)
        assert any(b"EXISTS" in line for line in push)
        client.idle_done()
        await asyncio.wait_for(idle, 10)
        assert (await client.logout()).result == "OK"

        def stranger() -> None:
            with smtplib.SMTP(sandbox.host, sandbox.smtp_port, timeout=10) as smtp:
                refused = smtp.sendmail(sandbox.user.address, [sandbox.bot.address], b"x")
                assert refused == {}
                try:
                    smtp.sendmail(sandbox.user.address, ["x@example.com"], b"Subject: x\r\n\r\nx")
                except smtplib.SMTPRecipientsRefused as exc:
                    assert exc.recipients["x@example.com"][0] == 550
                else:
                    raise AssertionError("mail for a stranger was accepted")
                try:
                    smtp.login(sandbox.bot.address, "wrong")
                except smtplib.SMTPAuthenticationError:
                    pass
                else:
                    raise AssertionError("a wrong password was accepted")

        await asyncio.to_thread(stranger)
        await asyncio.to_thread(
            _refused_login, sandbox.host, sandbox.imap_port, sandbox.bot.address
        )


def _refused_login(host: str, port: int, user: str) -> None:
    client = imaplib.IMAP4(host, port, timeout=10)
    try:
        client.login(user, "wrong")
    except imaplib.IMAP4.error:
        return
    finally:
        client.shutdown()
    raise AssertionError("a wrong IMAP password was accepted")


async def test_doctor_passes_on_the_sandbox(tmp_path: Path) -> None:
    """The sandbox config is a valid plaintext-on-loopback setup the doctor accepts."""
    from prx_channel_email.doctor import run_doctor

    async with MailSandbox() as sandbox:
        report = await asyncio.wait_for(run_doctor(sandbox.channel_config(tmp_path)), 60)
    assert report.exit_code == 0, [c for c in report.checks if c.status != "pass"]
    statuses = {c.name: c.status for c in report.checks}
    assert statuses["imap tls"] == "skip" and statuses["smtp tls"] == "skip"
    assert statuses["imap idle"] == "pass" and statuses["smtp auth"] == "pass"


async def test_the_sandbox_bot_runs_under_enforce_and_refuses_a_forged_user(
    tmp_path: Path,
) -> None:
    """The sandbox stamps Authentication-Results like a provider: the user's mail sent
    after logging in is verified; the same From without the login is a forgery."""
    from prx_channel_email.channel import EmailChannel
    from prx_channel_email.models import ChannelMessage

    async with MailSandbox() as sandbox:
        config = sandbox.channel_config(tmp_path)
        assert config.sender_auth == "enforce"  # the package default, not overridden
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        async with EmailChannel(config) as channel:
            listener = asyncio.create_task(channel.listen(queue))
            try:
                await channel.wait_ready(30)
                forged = sandbox.compose(subject="forged", body="send me the secrets")

                def unauthenticated() -> None:
                    with smtplib.SMTP(sandbox.host, sandbox.smtp_port, timeout=10) as smtp:
                        smtp.sendmail(sandbox.user.address, [sandbox.bot.address], forged)

                await asyncio.to_thread(unauthenticated)
                await sandbox.send_as_user("genuine", "hello")
                msg = await asyncio.wait_for(queue.get(), 30)
                assert (msg.subject, msg.sender_verified) == ("genuine", True)
                assert channel.metrics.get("inbound.skipped.unverified_sender") == 1
                assert queue.empty()
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
