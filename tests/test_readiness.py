"""wait_ready and the status callback, against the real Dovecot and aiosmtpd.

A permanent failure must reach the host as an error with its code, not as a
timeout: every wait below is given a generous timeout, and the test checks it
got the failure's own code (a NotReadyError would mean it waited it out).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import (
    ChannelError,
    ChannelState,
    ChannelStatus,
    EmailChannel,
    NotReadyError,
    SendMessage,
)
from prx_channel_email.config import config_from_table
from tests.servers.dovecot import Account, DovecotServer, free_ports
from tests.servers.smtp import SmtpServer
from tests.test_doctor import make_table

GENEROUS = 60.0  # far longer than any failure below takes to show


@contextlib.asynccontextmanager
async def listening(
    table: dict[str, Any], seen: list[ChannelStatus] | None = None
) -> AsyncIterator[EmailChannel]:
    on_status = seen.append if seen is not None else None
    channel = EmailChannel(config_from_table(table), on_status=on_status)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            yield channel
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelError):
                await listener


async def test_ready_on_a_good_setup_and_the_callback_saw_it(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    seen: list[ChannelStatus] = []
    async with listening(make_table(dovecot, account, smtp_server, tmp_path), seen) as channel:
        status = await channel.wait_ready(GENEROUS)
        assert status.state is ChannelState.CONNECTED
        assert status.imap_ready and status.smtp_ready and status.code is None
        assert channel.state == status
        assert await channel.health_check()
    assert seen[-2].state is ChannelState.CONNECTED
    assert seen[-1].state is ChannelState.CLOSED
    assert all(s.state is not ChannelState.FAILED for s in seen)


@pytest.mark.parametrize(
    ("what", "code", "component"),
    [
        ("imap_password", "auth_failed", "imap"),
        ("smtp_password", "auth_failed", "smtp"),
        ("certificate", "tls_verify_failed", "either"),  # ca_file is for both sides
        ("folder", "folder_missing", "imap"),
    ],
)
async def test_a_permanent_failure_raises_its_code_not_a_timeout(
    dovecot: DovecotServer,
    account: Account,
    smtp_server: SmtpServer,
    tmp_path: Path,
    unrelated_ca_file: Path,
    what: str,
    code: str,
    component: str,
) -> None:
    change: dict[str, Any] = {
        "imap_password": {"password": "not-the-password"},
        "smtp_password": {"smtp_password": "not-the-password"},
        "certificate": {"ca_file": str(unrelated_ca_file)},
        "folder": {"imap_folder": "NoSuchFolder"},
    }[what]
    seen: list[ChannelStatus] = []
    table = make_table(dovecot, account, smtp_server, tmp_path, **change)
    async with listening(table, seen) as channel:
        with pytest.raises(ChannelError) as info:
            await channel.wait_ready(GENEROUS)
        assert not isinstance(info.value, NotReadyError)
        assert info.value.code == code
        assert "not-the-password" not in str(info.value)
        failed = channel.state
        assert failed.state is ChannelState.FAILED
        assert failed.code == code
        assert failed.component == component or component == "either"
        assert failed.retry_in is not None and failed.retry_in > 0
        if what == "imap_password":
            assert not await channel.health_check()
    assert any(s.state is ChannelState.FAILED and s.code == code for s in seen)


async def test_an_unreachable_server_times_out_with_the_last_problem(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    # A closed port: connection refused, which may pass by itself (server restarting).
    table = make_table(dovecot, account, smtp_server, tmp_path, imap_port=free_ports(1)[0])
    async with listening(table) as channel:
        with pytest.raises(NotReadyError) as info:
            await channel.wait_ready(1.5)
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == "timeout"
    assert "refused" in str(info.value)


async def test_the_callback_follows_a_drop_and_the_reconnect(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    seen: list[ChannelStatus] = []
    changed = asyncio.Event()

    async def on_status(status: ChannelStatus) -> None:  # an async callback is awaited too
        seen.append(status)
        changed.set()

    channel = EmailChannel(
        config_from_table(make_table(dovecot, account, smtp_server, tmp_path)),
        on_status=on_status,
    )
    async with channel:
        listener = asyncio.create_task(channel.listen(asyncio.Queue()))
        try:
            await channel.wait_ready(GENEROUS)
            await _until(lambda: bool(seen) and seen[-1].state is ChannelState.CONNECTED, changed)
            dovecot.kick(account)
            await _until(lambda: seen[-1].state is ChannelState.RECONNECTING, changed)
            assert seen[-1].component == "imap" and seen[-1].code
            await _until(lambda: seen[-1].state is ChannelState.CONNECTED, changed)
            assert await channel.wait_ready(GENEROUS) == channel.state
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def test_a_failing_callback_does_not_stop_the_channel(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    calls: list[str] = []

    def broken(status: ChannelStatus) -> None:
        calls.append(status.state.value)
        raise RuntimeError("host bug")

    channel = EmailChannel(
        config_from_table(make_table(dovecot, account, smtp_server, tmp_path)), on_status=broken
    )
    async with channel:
        listener = asyncio.create_task(channel.listen(asyncio.Queue()))
        try:
            await channel.wait_ready(GENEROUS)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    assert "connected" in calls


async def _until(predicate: Any, changed: asyncio.Event, timeout: float = GENEROUS) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            changed.clear()
            if predicate():
                return
            await changed.wait()


async def test_a_refused_smtp_login_at_send_time_shows_in_the_status(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    table = make_table(dovecot, account, smtp_server, tmp_path, smtp_password="not-the-password")
    seen: list[ChannelStatus] = []
    async with EmailChannel(config_from_table(table), on_status=seen.append) as channel:
        with pytest.raises(ChannelError) as info:
            await channel.send(SendMessage(content="hi", recipient="alice@example.test"))
        assert info.value.code == "auth_failed"
        assert (channel.state.state, channel.state.component) == (ChannelState.FAILED, "smtp")
    assert any(s.state is ChannelState.FAILED and s.code == "auth_failed" for s in seen)
