"""The token lifecycle across connections, restarts, crashes and new sign-ins."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from prx_channel_email import EmailChannel
from prx_channel_email._net.imap import open_session
from prx_channel_email._net.smtp import SmtpTransport
from prx_channel_email._oauth import tokens as oauth_module
from prx_channel_email._oauth.flows import login_device
from prx_channel_email._oauth.tokens import KILL_BEFORE_SAVE_ENV, TokenManager, token_store
from prx_channel_email._outbound.sent_folder import ImapSentFolder
from prx_channel_email.errors import ChannelError, OAuthReauthRequired
from prx_channel_email.models import ChannelMessage, SendMessage
from tests.oauth_helpers import ANN, human_mail, oauth_config
from tests.operator_helpers import subprocess_env
from tests.servers.dovecot import DovecotServer
from tests.servers.oauth_server import OAuthServer
from tests.servers.smtp import SmtpServer

ROOT = Path(__file__).resolve().parent.parent


async def test_imap_smtp_and_sent_copy_needing_a_token_at_once_make_one_request(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    dovecot_oauth.create_folder(account, "Sent")
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    tokens = TokenManager(config)  # the account's one manager, handed to all three
    transport = SmtpTransport(config, tokens=tokens)
    sent = ImapSentFolder(config, tokens)
    try:
        session, _, _ = await asyncio.gather(
            open_session(config, tokens),
            transport.send(account.address, ANN, b"Subject: a\r\n\r\nx\r\n"),
            sent.save(b"Subject: a\r\nMessage-ID: <s@x>\r\n\r\nx\r\n", "<s@x>"),
        )
        await session.logout()
    finally:
        await transport.close()
        await sent.close()
    assert oauth_server.token_requests["refresh_token"] == 1
    assert len(dovecot_oauth.list_uids(account, "Sent")) == 1


async def test_rotation_survives_a_restart_and_a_new_seed_replaces_the_store(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    seed = config.oauth_refresh_token
    assert seed is not None
    async with EmailChannel(config) as channel:
        assert channel.tokens is not None
        await channel.tokens.token()  # strict rotation: the seed is now spent
    store = token_store(config)
    first = await store.load()
    assert first is not None and first.refresh_token != seed.get_secret_value()

    oauth_server.expire_access_tokens()  # the restarted channel must refresh again
    async with EmailChannel(config) as channel:  # same config, same (spent) seed
        session = await open_session(channel.config, channel.tokens)
        await session.logout()
        assert await channel.health_check()
    second = await store.load()
    assert second is not None and second.refresh_token not in (
        first.refresh_token,
        seed.get_secret_value(),
    )

    # The operator pastes a new refresh token: it replaces the stored grant.
    fresh_seed = oauth_server.issue(account.username)
    replaced = config.model_copy(update={"oauth_refresh_token": SecretStr(fresh_seed)})
    oauth_server.expire_access_tokens()
    session = await open_session(replaced, TokenManager(replaced))
    await session.logout()
    third = await store.load()
    assert third is not None and third.seed != second.seed
    assert oauth_server.token_requests["refresh_token"] == 3


def _kill_child(config_json: str, *, kill: bool) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    if kill:
        env[KILL_BEFORE_SAVE_ENV] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "oauth_kill_child.py"), config_json],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("rotation", ["strict", "grace"])
async def test_sigkill_between_a_rotated_token_and_its_save(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot_oauth: DovecotServer,
    smtp_oauth: SmtpServer,
    rotation: str,
) -> None:
    """The token endpoint rotated the refresh token, the process died before the rename.

    The store still holds what it held before (never a half-written file). With
    strict rotation the old token is spent: the next start reports
    oauth_reauth_required (one request, then none) until `auth login`; with a
    provider that keeps the old token valid for a while, the next start just works.
    """
    oauth_server.rotation = rotation
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    data = config.model_dump(mode="json")
    data["oauth_refresh_token"] = config.oauth_refresh_token.get_secret_value()  # type: ignore[union-attr]
    done = _kill_child(json.dumps(data), kill=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert await token_store(config).load() is None  # nothing half-written, nothing at all
    assert oauth_server.token_requests["refresh_token"] == 1

    async with EmailChannel(config) as channel:
        assert channel.tokens is not None
        if rotation == "grace":
            await channel.tokens.token()
            assert await channel.health_check()
            return
        for _ in range(3):
            with pytest.raises(OAuthReauthRequired):
                await channel.tokens.token()
        assert not await channel.health_check()
        assert oauth_server.token_requests["refresh_token"] == 2  # one try, then no storm

        # The fix: sign in again (device flow approved on the server); no restart.
        approve = threading.Thread(target=_approve_next, args=(oauth_server, account.username))
        approve.start()
        await login_device(config, say=lambda _: None, within=30)
        approve.join(10)
        await channel.tokens.token()
        assert await channel.health_check()


async def until(predicate: Callable[[], bool], within: float = 30.0) -> None:
    """Wait (bounded) for a condition the code under test sets on its own time."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _approve_next(server: OAuthServer, user: str) -> None:
    server.approve(server.wait_device_request(timeout=20), user)


async def test_a_running_channel_picks_up_a_new_sign_in(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot_oauth: DovecotServer,
    smtp_oauth: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Revoked grant: the listener waits for a sign-in, costing no token requests, and
    carries on by itself once `auth login` wrote a new grant."""
    monkeypatch.setattr(oauth_module, "REAUTH_POLL_SECS", 0.5)  # the real one is 20 s
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    oauth_server.revoke_all(account.username)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await until(lambda: channel.sync.status.last_error_code == "oauth_reauth_required")
            assert not await channel.health_check()
            with pytest.raises(ChannelError) as info:
                await channel.wait_ready(30)
            assert info.value.code == "oauth_reauth_required"
            # Several listener retries later: still just the one refused request.
            await until(lambda: channel.stats().get("imap.reconnects.auth", 0) >= 4)
            assert oauth_server.token_requests["refresh_token"] == 1
            approve = threading.Thread(target=_approve_next, args=(oauth_server, account.username))
            approve.start()
            await login_device(config, say=lambda _: None, within=30)
            approve.join(10)
            await asyncio.wait_for(channel.sync.synced.wait(), timeout=30)
            assert await channel.health_check()
            # The SMTP readiness check, failed with the same code, comes back as quickly.
            await until(lambda: channel.state.code is None)
            assert (await channel.wait_ready(30)).smtp_ready
            dovecot_oauth.deliver(
                account, human_mail("<after@people.example>", "back", to=account.address)
            )
            msg = await asyncio.wait_for(queue.get(), timeout=30)
            assert msg.id == "<after@people.example>"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


async def test_a_host_token_provider_is_asked_before_every_login(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(
        tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account, seed=False
    ).model_copy(update={"auth_method": "password"})
    oauth_server.rotation = "off"
    grant = oauth_server.issue(account.username)
    calls = 0

    async def provider() -> tuple[str, float | None]:
        nonlocal calls
        calls += 1
        return await asyncio.to_thread(oauth_server.access_token_for, grant), None

    channel = EmailChannel(config, token_provider=provider)
    async with channel:
        for _ in range(2):
            session = await open_session(channel.config, channel.tokens)
            await session.logout()
        await channel.send_message(SendMessage(content="hello", recipient=ANN, subject="hi"))
    assert calls == 3
    assert smtp_oauth.wait_for_messages(1)[0].auth_login == account.username
    assert await token_store(config).load() is None  # the host keeps its tokens


async def test_the_mailbox_tools_log_in_with_the_channels_token_manager(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    """The tools' own IMAP session is handed the channel's manager: it logs in with the
    token the channel already holds, no second refresh."""
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    async with EmailChannel(config) as channel:
        assert channel.tokens is not None
        await channel.tokens.token()
        try:
            listed = await channel.tools.list_folders()
        finally:
            await channel.tools.close()
    assert "INBOX" in str(listed)
    assert oauth_server.token_requests["refresh_token"] == 1
