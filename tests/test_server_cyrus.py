"""A real Cyrus IMAP 3.6.1 (Debian's build, unpacked with dpkg -x, never installed).

Receive, restart and a threaded reply; ``move_to_folder = "Processed"`` lands in
Cyrus's ``INBOX/Processed`` (its personal namespace); without ``idled`` (Debian's
default), ``doctor --push-test`` finds that IDLE does not push and names the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.doctor import run_doctor
from prx_channel_email.models import ChannelMessage
from tests.config_builder import build_config
from tests.integration_helpers import wait_until
from tests.outbound_helpers import ANN, human_mail, parse
from tests.servers.cyrus import CyrusError, CyrusServer
from tests.servers.dovecot import Account
from tests.servers.smtp import SmtpServer


def _cyrus(**kw: bool) -> Iterator[CyrusServer]:
    try:
        server = CyrusServer(**kw)
        server.start()
    except CyrusError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cyrus() -> Iterator[CyrusServer]:
    yield from _cyrus()


@pytest.fixture(scope="module")
def cyrus_without_idled() -> Iterator[CyrusServer]:
    """Debian's default cyrus.conf: idled commented out."""
    yield from _cyrus(idled=False)


def _config(tmp_path: Path, cyrus: CyrusServer, account: Account, smtp: SmtpServer) -> EmailConfig:
    return build_config(
        tmp_path / "state",
        account=account,
        smtp=smtp,
        imap_port=cyrus.imap_port,
        imap_security="plain",  # loopback only
        from_address=f"bot@{account.address.rpartition('@')[2]}",
        allowed_senders=[ANN],
        initial_sync="new",
        move_to_folder="Processed",
        keepalive_secs=30,
    )


async def _next(queue: asyncio.Queue[ChannelMessage]) -> ChannelMessage:
    return await asyncio.wait_for(queue.get(), timeout=30)


async def test_receive_restart_and_reply_on_cyrus(
    tmp_path: Path, cyrus: CyrusServer, smtp_server: SmtpServer
) -> None:
    account = cyrus.add_user()
    cyrus.create_folder(account, "INBOX/Processed")
    cyrus.deliver(account, human_mail("<old@people.example>", "Old", "before"), mail_from=ANN)
    config = _config(tmp_path, cyrus, account, smtp_server)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await channel.wait_ready(30)
            cyrus.deliver(
                account, human_mail("<c1@people.example>", "Question", "?"), mail_from=ANN
            )
            first = await _next(queue)
            assert first.id == "<c1@people.example>"
            await channel.send(first.reply("Answer."))
            assert parse(smtp_server.messages[-1].raw)["In-Reply-To"] == "<c1@people.example>"
            await wait_until(lambda: len(cyrus.list_uids(account, "INBOX/Processed")) == 1, 30)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    cyrus.deliver(account, human_mail("<c2@people.example>", "Again", "?"), mail_from=ANN)
    queue = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            second = await _next(queue)  # nothing earlier comes again
            assert second.id == "<c2@people.example>"
            await wait_until(lambda: len(cyrus.list_uids(account, "INBOX/Processed")) == 2, 30)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    assert len(cyrus.list_uids(account)) == 1  # the old mail, untouched


async def test_doctor_on_cyrus_resolves_folders_and_names_idled(
    tmp_path: Path, cyrus_without_idled: CyrusServer, smtp_server: SmtpServer
) -> None:
    """Without idled, Cyrus announces new mail only on its own ~60 s check: the push
    test says so and names the fix; move_to_folder is found as INBOX/Processed."""
    server = cyrus_without_idled
    account = server.add_user()
    server.create_folder(account, "INBOX/Processed")
    config = _config(tmp_path, server, account, smtp_server)
    report = await run_doctor(config, push_test=True, check_timeout=5)
    idle, folders = report.get("imap idle"), report.get("imap folders")
    assert idle is not None and idle.status == "warn", idle
    assert "enable idled in cyrus.conf" in (idle.fix or "")
    assert folders is not None and folders.status == "pass", folders
    assert "'INBOX/Processed'" in folders.detail
    assert server.list_uids(account) == []  # the test message is gone again
