"""OAuth 2.0 end to end: XOAUTH2/OAUTHBEARER against Dovecot's oauth2 passdb and an
XOAUTH2 SMTP server, both checking tokens at the local authorization server."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

from prx_channel_email import EmailChannel
from prx_channel_email._net.imap import ImapSession, open_session
from prx_channel_email._net.smtp import SmtpFailure, SmtpTransport
from prx_channel_email._oauth.tokens import TokenManager, token_store
from prx_channel_email._storage import open_storage
from prx_channel_email._storage.sqlite.store import DB_NAME
from prx_channel_email.errors import (
    AuthenticationError,
    OAuthReauthRequired,
    OAuthUnavailable,
    SendError,
)
from prx_channel_email.models import ChannelMessage, SendMessage
from tests.oauth_helpers import ANN, human_mail, oauth_config
from tests.servers.dovecot import DovecotServer
from tests.servers.oauth_server import OAuthServer
from tests.servers.smtp import SmtpServer


async def test_imap_and_smtp_log_in_with_one_refresh(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    tokens = TokenManager(config)  # the account's one manager, handed to both
    session = await open_session(config, tokens)
    try:
        folders = await session.list_folders()
    finally:
        await session.logout()
    assert "INBOX" in folders
    transport = SmtpTransport(config, tokens=tokens)
    try:
        await transport.send(account.address, ANN, b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        await transport.close()
    assert smtp_oauth.wait_for_messages(1)[0].auth_login == account.username
    # The SMTP login reused the token the IMAP login had fetched.
    assert oauth_server.token_requests["refresh_token"] == 1
    # The grant is kept where the state is, owner-only.
    assert await token_store(config).load() is not None
    assert stat.S_IMODE((config.state_dir / DB_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(config.state_dir.stat().st_mode) == 0o700
    assert await token_store(config).private()


async def test_oauthbearer_is_used_where_only_it_is_offered(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    session = await ImapSession.connect(config, tokens=TokenManager(config))
    try:
        # As a server offering only OAUTHBEARER would advertise itself.
        session.capabilities = frozenset(c for c in session.capabilities if c != "AUTH=XOAUTH2")
        await session.login()
        assert await session.list_folders()
    finally:
        await session.logout()
    assert "method=OAUTHBEARER" in dovecot_oauth.log_tail(200)


async def test_a_refused_cached_token_is_refreshed_once_and_the_login_goes_on(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    tokens = TokenManager(config)
    await (await open_session(config, tokens)).logout()
    oauth_server.expire_access_tokens()  # the cached token still looks valid to us
    session = await open_session(config, tokens)
    await session.logout()
    assert oauth_server.token_requests["refresh_token"] == 2


async def test_revoked_grant_means_reauth_bounded_retries_and_no_token_in_logs(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot_oauth: DovecotServer,
    smtp_oauth: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    oauth_server.revoke_all(account.username)
    manager = TokenManager(config)
    for _ in range(10):  # a listener and an outbox retrying, again and again
        with pytest.raises(OAuthReauthRequired) as info:
            await open_session(config, manager)
    assert info.value.code == "oauth_reauth_required"
    assert "prx-email auth login" in info.value.message
    assert manager.reauth_required
    assert oauth_server.token_requests["refresh_token"] == 1  # no refresh storm
    seed = config.oauth_refresh_token
    assert seed is not None
    assert seed.get_secret_value() not in caplog.text


async def test_token_endpoint_outage_backs_off_then_recovers(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    oauth_server.fail_next(1, 503)
    manager = TokenManager(config)
    for _ in range(5):
        with pytest.raises(OAuthUnavailable) as info:
            await manager.token()
        assert info.value.code == "oauth_token_unavailable"
    assert oauth_server.token_requests["refresh_token"] == 1  # backed off, not hammered
    manager._outage_until = 0.0  # the backoff elapsed
    assert (await manager.token()).value
    assert not manager.reauth_required


async def test_channel_receives_and_replies_with_short_lived_tokens(
    tmp_path: Path,
    oauth_server: OAuthServer,
    dovecot_oauth: DovecotServer,
    smtp_oauth: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Access tokens live 1 s (or are dropped early); mail keeps arriving and replies
    keep going out, each login with a token that is still good."""
    caplog.set_level(logging.DEBUG)
    oauth_server.access_ttl = 1.0
    account = dovecot_oauth.add_user()
    config = oauth_config(
        tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account, keepalive_secs=1
    )
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await asyncio.wait_for(channel.sync.synced.wait(), timeout=30)
            for i in range(4):
                dovecot_oauth.deliver(
                    account, human_mail(f"<m{i}@people.example>", f"n{i}", to=account.address)
                )
                msg = await asyncio.wait_for(queue.get(), timeout=30)
                assert msg.id == f"<m{i}@people.example>"
                await channel.send(msg.reply(f"answer {i}"))
                if i % 2:  # the server drops the tokens in hand before they expire
                    oauth_server.expire_access_tokens()
                dovecot_oauth.kick(account)  # force a new IMAP login
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        assert await channel.health_check()
    sent = smtp_oauth.wait_for_messages(4)
    assert sorted(m.message()["Subject"] for m in sent) == [f"Re: n{i}" for i in range(4)]
    assert oauth_server.token_requests["refresh_token"] >= 3  # start + two dropped
    record = await token_store(config).load()
    assert record is not None
    secrets = [record.refresh_token, record.access_token]
    for line in caplog.messages:
        assert not any(s and s in line for s in secrets)
    # What the store holds is the rotated token the channel uses, read back fresh.
    again = await open_storage(config.state_dir).tokens(config.account).load()
    assert again is not None and again.refresh_token == record.refresh_token


async def test_send_with_a_revoked_grant_raises_reauth_required(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    account = dovecot_oauth.add_user()
    config = oauth_config(tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account)
    oauth_server.revoke_all(account.username)
    async with EmailChannel(config) as channel:
        for _ in range(3):
            with pytest.raises(SendError) as info:
                await channel.send(SendMessage(content="hi", recipient=ANN, subject="s"))
            assert info.value.code == "oauth_reauth_required"
        assert not await channel.health_check()
    assert oauth_server.token_requests["refresh_token"] == 1
    assert smtp_oauth.messages == []


async def test_a_token_the_server_keeps_refusing_fails_fast_with_its_reason(
    tmp_path: Path, oauth_server: OAuthServer, dovecot_oauth: DovecotServer, smtp_oauth: SmtpServer
) -> None:
    """A valid token of another account: the server's error challenge is answered (no
    hang), one refresh is tried, then the login fails with a fix, not a reauth."""
    account = dovecot_oauth.add_user()
    other = dovecot_oauth.add_user()
    config = oauth_config(
        tmp_path, oauth_server, dovecot_oauth, smtp_oauth, account,
        oauth_refresh_token=oauth_server.issue(other.username),
    )  # fmt: skip
    tokens = TokenManager(config)
    with pytest.raises(AuthenticationError) as info:
        await asyncio.wait_for(open_session(config, tokens), 30)
    assert info.value.code == "oauth_token_refused"
    assert not tokens.reauth_required
    with pytest.raises(SmtpFailure) as sent:
        await SmtpTransport(config, tokens=tokens).send(
            account.address, ANN, b"Subject: x\r\n\r\ny\r\n"
        )
    assert sent.value.code == "oauth_token_refused" and sent.value.permanent
    assert "535" in sent.value.message
