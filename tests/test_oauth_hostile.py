"""A hostile or broken token endpoint (the local authorization server misbehaving on
purpose): every such answer costs at most one bounded request, ends as
``oauth_token_unavailable`` with backoff, and leaves the token store lock free.
And ``auth login``'s loopback listener, which stray local requests must not end."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from prx_channel_email._oauth.flows import login_browser
from prx_channel_email._oauth.tokens import TokenManager, token_store
from prx_channel_email._storage import TokenRecord
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError, OAuthUnavailable
from tests.servers.oauth_server import CLIENT_ID, OAuthServer

USER = "user@example.test"


def token_config(tmp_path: Path, oauth_server: OAuthServer) -> EmailConfig:
    """Only the token endpoint matters here: no mail server is contacted."""
    return EmailConfig(
        imap_host="127.0.0.1",
        smtp_host="127.0.0.1",
        username=USER,
        from_address=USER,
        state_dir=tmp_path / "state",
        connect_timeout_secs=3.0,
        allowed_senders=["*"],
        auth_method="oauth2",
        oauth_provider="custom",
        oauth_client_id=CLIENT_ID,
        oauth_token_url=f"{oauth_server.url}/token",
        oauth_authorize_url=f"{oauth_server.url}/authorize",
        oauth_scopes=["mail"],
        oauth_refresh_token=oauth_server.issue(USER),
    )


async def lock_is_free(config: EmailConfig) -> bool:
    """Nobody holds the one-refresh lock (a second holder would be refused at once)."""
    try:
        async with token_store(config).locked(0.0):
            return True
    except OAuthUnavailable:
        return False


@pytest.mark.parametrize("mode", ["slow_drip", "slow_header", "chunked_forever", "huge"])
async def test_a_slow_endless_or_huge_answer_is_cut_off_and_backed_off(
    tmp_path: Path, oauth_server: OAuthServer, mode: str
) -> None:
    """httpx's timeouts are per read: without a total deadline a drip of one byte per
    0.2 s holds token() (and the store lock) for minutes; an 8 MB answer is read whole."""
    config = token_config(tmp_path, oauth_server)
    manager = TokenManager(config)
    oauth_server.misbehave_next(mode, b"x" * (8 << 20) if mode == "huge" else b"")
    with pytest.raises(OAuthUnavailable) as info:
        await asyncio.wait_for(manager.token(), 60)
    assert info.value.code == "oauth_token_unavailable"
    assert await lock_is_free(config)
    # The client hung up: the server is not left sending into a void.
    assert await asyncio.to_thread(oauth_server.misbehaving_done.wait, 30)
    # Backed off: the next caller gets the same answer without a new request.
    requests = oauth_server.total_token_requests()
    with pytest.raises(OAuthUnavailable):
        await asyncio.wait_for(manager.token(), 60)
    assert oauth_server.total_token_requests() == requests
    assert await token_store(config).load() is None  # nothing unusable was stored
    manager._outage_until = 0.0  # the backoff elapsed: a good answer works again
    assert (await manager.token()).value


@pytest.mark.parametrize(
    "body",
    [
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": 1e400}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": -60}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": 0}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": 1e12}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": "soon"}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": true}',
        b'{"access_token": "at-1", "token_type": "mac", "expires_in": 3600}',
        b'{"access_token": "at-1", "expires_in": 3600}',
        b'{"access_token": 42, "token_type": "Bearer", "expires_in": 3600}',
        b'{"access_token": "at-1", "token_type": "Bearer", "expires_in": 3600',
        b"[1, 2]",
    ],
    ids=[
        "overflow", "negative", "zero", "centuries", "text", "bool", "mac", "no-type",
        "number-token", "truncated", "not-an-object",
    ],
)  # fmt: skip
async def test_an_unusable_token_answer_is_an_outage_not_a_crash(
    tmp_path: Path, oauth_server: OAuthServer, body: bytes
) -> None:
    """``expires_in: 1e400`` made authlib's int() raise OverflowError out of token()
    (and send()); a non-Bearer type or an absurd lifetime was believed."""
    config = token_config(tmp_path, oauth_server)
    manager = TokenManager(config)
    oauth_server.misbehave_next("body", body)
    with pytest.raises(OAuthUnavailable) as info:
        await asyncio.wait_for(manager.token(), 60)
    assert info.value.code == "oauth_token_unavailable"
    assert manager._outage_until > manager.now()  # backed off
    assert await token_store(config).load() is None


async def test_a_lowercase_bearer_type_and_a_string_lifetime_are_accepted(
    tmp_path: Path, oauth_server: OAuthServer
) -> None:
    """RFC 6749 token types are case-insensitive; some providers send expires_in as text."""
    config = token_config(tmp_path, oauth_server)
    oauth_server.misbehave_next(
        "body", b'{"access_token": "at-1", "token_type": "bearer", "expires_in": "3600"}'
    )
    manager = TokenManager(config)
    token = await manager.token()
    assert token.value == "at-1"
    assert token.expires_at is not None and token.expires_at > manager.now() + 3000


async def browser_login_in_background(
    config: EmailConfig,
) -> tuple[asyncio.Task[TokenRecord], str]:
    """``auth login --no-browser`` in this loop; returns the task and the printed URL."""
    said: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        login_browser(config, open_browser=False, say=said.put_nowait, within=60)
    )
    while True:
        line = await asyncio.wait_for(said.get(), 30)
        urls = [w for w in line.split() if w.startswith("http") and "/authorize" in w]
        if urls:
            return task, urls[0]


async def test_stray_requests_to_the_login_listener_get_400_and_the_login_goes_on(
    tmp_path: Path, oauth_server: OAuthServer
) -> None:
    """Any local process could end a sign-in by sending the loopback listener a
    request with a wrong or no state; now only the real redirect counts."""
    oauth_server.user = USER
    config = token_config(tmp_path, oauth_server).model_copy(update={"oauth_refresh_token": None})
    task, url = await browser_login_in_background(config)
    port = int(parse_qs(urlsplit(url).query)["redirect_uri"][0].rsplit(":", 1)[1].strip("/"))
    listener = f"http://127.0.0.1:{port}/"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as browser:
        for stray in ("?state=forged&code=stolen", "?code=stolen", "?error=access_denied", ""):
            answer = await browser.get(listener + stray)
            assert answer.status_code == 400, stray
            assert not task.done()
        page = await browser.get(url, follow_redirects=True)
        assert page.status_code == 200 and "Signed in" in page.text
    record = await asyncio.wait_for(task, 30)
    assert record.refresh_token and await token_store(config).load() == record


async def test_a_busy_redirect_port_is_a_clear_channel_error(
    tmp_path: Path, oauth_server: OAuthServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = token_config(tmp_path, oauth_server).model_copy(
            update={"oauth_redirect_port": port}
        )
        with pytest.raises(ChannelError) as info:
            await login_browser(config, open_browser=False, say=lambda _: None, within=10)
    assert info.value.code == "oauth_redirect_port_unavailable"
    assert f"127.0.0.1:{port}" in str(info.value) and "oauth_redirect_port" in str(info.value)
