"""Signing in: the flows behind ``prx-email auth login | status | logout``.

* Authorization code with PKCE (S256) and a loopback redirect on 127.0.0.1
  (RFC 8252): a one-request HTTP listener on this machine receives the code.
* Device authorization grant (RFC 8628), for a headless server: the user enters a
  short code on another device. Google does not allow the mail scope in it.

Either way the grant goes to the token store (the storage's, per account, owner-only),
and a running channel picks it up by itself (it watches the record's version). authlib does the
protocol (authorization URL, PKCE, token requests, revocation); nothing here prints
or logs a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prx_channel_email._oauth.tokens import (
    BadTokenAnswer,
    fingerprint,
    http_error_class,
    oauth_client,
    token_call,
    token_store,
    usable_answer,
)
from prx_channel_email._storage import TokenRecord
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.providers import (
    OAuthEndpoints,
    missing_scopes,
    oauth_endpoints,
    provider_named,
)
from prx_channel_email.errors import ChannelError

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
LOGIN_TIMEOUT_SECS = 300.0
_DONE_PAGE = (
    b"<!doctype html><title>prx-email</title><p>Signed in. You can close this window and "
    b"go back to the terminal.</p>"
)

Say = Callable[[str], None]


class LoginError(ChannelError):
    code = "oauth_login_failed"


async def _store_grant(
    config: EmailConfig, provider: OAuthEndpoints, token: dict[str, Any]
) -> TokenRecord:
    if not token.get("refresh_token"):
        raise LoginError(
            "the provider returned no refresh token, so the channel could not renew access; "
            + provider_named(provider.name).oauth_refresh_hint
        )
    try:
        expires_in = usable_answer(token)
    except BadTokenAnswer as exc:
        raise LoginError(f"the token endpoint {exc}") from None
    now = time.time()
    seed = config.oauth_refresh_token
    record = TokenRecord(
        refresh_token=str(token["refresh_token"]),
        access_token=str(token.get("access_token") or "") or None,
        expires_at=now + expires_in if expires_in is not None else None,
        lifetime=expires_in,
        scope=str(token.get("scope") or " ".join(provider.scopes)),
        # A login supersedes the configured seed: the seed only wins again once changed.
        seed=fingerprint(seed.get_secret_value()) if seed is not None else None,
        provider=provider.name,
        username=config.username,
        updated_at=now,
    )
    await token_store(config).save(record)
    return record


def _oauth_failure(exc: Exception) -> LoginError:
    error = getattr(exc, "error", None) or type(exc).__name__
    description = getattr(exc, "description", None)
    text = f"{error}: {description}" if description else str(error)
    return LoginError(f"the token endpoint refused the sign-in ({text})")


@dataclass
class _Redirect:
    """The one request the browser makes to our loopback listener."""

    query: dict[str, str]


class _Listener:
    """The loopback redirect listener. Only a request carrying our ``state`` ends the
    wait; any other (a port scan, a stray or forged request from another local
    process) gets 400 and the wait goes on, so no local process can deny a sign-in."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.arrived: asyncio.Future[_Redirect] = asyncio.get_running_loop().create_future()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, port: int) -> int:
        try:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        except OSError as exc:
            raise LoginError(
                f"cannot listen for the sign-in redirect on 127.0.0.1:{port} "
                f"({exc.strerror or exc}); free that port or change oauth_redirect_port "
                "(0 picks a free one, if the provider allows any loopback port)",
                code="oauth_redirect_port_unavailable",
            ) from None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _ours(self, query: dict[str, str]) -> bool:
        return (
            self.state is not None
            and query.get("state") == self.state
            and ("code" in query or "error" in query)
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("ascii", "replace")
            query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
            ok = self._ours(query) and not self.arrived.done()
            status = b"200 OK" if ok else b"400 Bad Request"
            body = _DONE_PAGE if ok else b""
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
            if ok and not self.arrived.done():
                self.arrived.set_result(_Redirect(query))
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
                IndexError):  # fmt: skip
            pass
        finally:
            writer.close()


async def login_browser(
    config: EmailConfig,
    *,
    open_browser: bool = True,
    say: Say = print,
    within: float = LOGIN_TIMEOUT_SECS,
) -> TokenRecord:
    """Authorization code + PKCE with a loopback redirect; returns the stored grant."""
    from authlib.common.security import generate_token

    provider = oauth_endpoints(config)
    if not provider.authorize_url:
        raise LoginError(
            "no authorization URL is configured (oauth_authorize_url); use --device",
            code="oauth_flow_unavailable",
        )
    listener = _Listener()
    port = await listener.start(config.oauth_redirect_port)
    redirect_uri = f"http://127.0.0.1:{port}/"
    client = oauth_client(
        config,
        redirect_uri=redirect_uri,
        scope=" ".join(provider.scopes),
        code_challenge_method="S256",
    )
    verifier = generate_token(64)
    try:
        async with client:
            url, state = client.create_authorization_url(
                provider.authorize_url, code_verifier=verifier, **dict(provider.authorize_params)
            )
            listener.state = state
            say(f"Open this URL in a browser and sign in as {config.username}:\n\n  {url}\n")
            if open_browser:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(webbrowser.open, url)
            say(f"Waiting for the sign-in to finish (listening on {redirect_uri}) ...")
            try:
                redirect = await asyncio.wait_for(listener.arrived, within)
            except TimeoutError:
                raise LoginError(
                    f"no sign-in within {within:g} s", code="oauth_login_timeout"
                ) from None
            query = redirect.query
            if "error" in query:
                detail = query.get("error_description") or query["error"]
                raise LoginError(f"the provider refused the sign-in: {detail}")
            try:
                token = await token_call(
                    config,
                    client.fetch_token(
                        provider.token_url,
                        grant_type="authorization_code",
                        code=query["code"],
                        code_verifier=verifier,
                        redirect_uri=redirect_uri,
                    ),
                )
            except BadTokenAnswer as exc:
                raise LoginError(f"the token endpoint {exc}") from None
            except http_error_class() as exc:
                raise LoginError(
                    f"the token endpoint could not be reached ({type(exc).__name__})"
                ) from None
            except Exception as exc:
                if getattr(exc, "error", None):
                    raise _oauth_failure(exc) from None
                raise
    finally:
        await listener.close()
    return await _store_grant(config, provider, dict(token))


async def login_device(
    config: EmailConfig, *, say: Say = print, within: float = LOGIN_TIMEOUT_SECS
) -> TokenRecord:
    """Device authorization grant (RFC 8628): show a code, poll until approved."""
    provider = oauth_endpoints(config)
    if provider.device_refusal:
        raise LoginError(provider.device_refusal, code="oauth_device_unsupported")
    if not provider.device_url:
        raise LoginError(
            "no device authorization URL is configured (oauth_device_url); "
            "use the browser flow (--no-browser prints its URL)",
            code="oauth_flow_unavailable",
        )
    client = oauth_client(config)
    async with client:
        try:
            resp = await token_call(
                config,
                client.request(
                    "POST",
                    provider.device_url,
                    data={"client_id": config.oauth_client_id, "scope": " ".join(provider.scopes)},
                    withhold_token=True,
                ),
            )
            answer = resp.json()
        except BadTokenAnswer as exc:
            raise LoginError(f"the device endpoint {exc}") from None
        except http_error_class() as exc:
            raise LoginError(
                f"the device endpoint could not be reached ({type(exc).__name__})"
            ) from None
        except ValueError:
            raise LoginError("the device endpoint did not answer JSON") from None
        if resp.status_code != 200 or "device_code" not in answer:
            raise LoginError(
                f"the device endpoint refused: {answer.get('error', resp.status_code)} "
                f"{answer.get('error_description', '')}".strip()
            )
        uri = answer.get("verification_uri_complete") or answer.get("verification_uri")
        say(f"On any device, open {uri} and enter the code {answer['user_code']}")
        say(f"(sign in as {config.username}; waiting up to {within:g} s) ...")
        interval = float(answer.get("interval") or 5)
        deadline = time.monotonic() + min(within, float(answer.get("expires_in") or within))
        while True:
            await asyncio.sleep(interval)
            try:
                token = await token_call(
                    config,
                    client.fetch_token(
                        provider.token_url,
                        grant_type=DEVICE_GRANT,
                        device_code=answer["device_code"],
                    ),
                )
                break
            except BadTokenAnswer as exc:
                raise LoginError(f"the token endpoint {exc}") from None
            except http_error_class() as exc:
                raise LoginError(
                    f"the token endpoint could not be reached ({type(exc).__name__})"
                ) from None
            except Exception as exc:
                error = getattr(exc, "error", None)
                if error == "authorization_pending":
                    pass
                elif error == "slow_down":
                    interval += 5
                elif error:
                    raise _oauth_failure(exc) from None
                else:
                    raise
            if time.monotonic() > deadline:
                raise LoginError("the code was not approved in time", code="oauth_login_timeout")
    return await _store_grant(config, provider, dict(token))


async def describe(config: EmailConfig) -> list[tuple[str, str]]:
    """``auth status``: what is stored, never a token."""
    provider = oauth_endpoints(config)
    store = token_store(config)
    rows = [("provider", provider.name), ("account", config.username), ("store", store.location)]
    record = await store.load()
    seed = config.oauth_refresh_token
    if record is None:
        rows.append(
            (
                "grant",
                "seeded from oauth_refresh_token (not used yet)"
                if seed
                else "none: run `prx-email auth login`",
            )
        )
        return rows
    if seed is not None and record.seed != fingerprint(seed.get_secret_value()):
        rows.append(("grant", "oauth_refresh_token differs from the stored grant: it replaces it"))
    rows.append(("grant", "stored" if record.refresh_token else "none"))
    rows.append(("scopes", record.scope or "(not reported)"))
    missing = missing_scopes(provider, record.scope)
    if missing:
        rows.append(("missing scopes", " ".join(missing)))
    if record.expires_at is not None:
        left = record.expires_at - time.time()
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
        state = f"in {left:.0f} s" if left > 0 else "expired (renewed at the next login)"
        rows.append(("access token expires", f"{when} ({state})"))
    rows.append(("updated", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.updated_at))))
    rows.append(
        (
            "owner-only",
            "yes" if await store.private() else "NO: chmod 600 the file, 700 the directory",
        )
    )
    return rows


async def logout(config: EmailConfig) -> list[str]:
    """Revoke the stored grant where the provider can, delete the store; what was done."""
    provider = oauth_endpoints(config)
    store = token_store(config)
    record = await store.load()
    done: list[str] = []
    if record is not None and record.refresh_token and provider.revoke_url:
        client = oauth_client(config)
        try:
            async with client:
                await client.revoke_token(
                    provider.revoke_url,
                    token=record.refresh_token,
                    token_type_hint="refresh_token",  # noqa: S106 - not a secret
                )
            done.append("revoked the grant at the provider")
        except Exception as exc:  # the local copy goes anyway
            done.append(f"could not revoke at the provider ({type(exc).__name__}); deleted locally")
    elif record is not None and not provider.revoke_url:
        done.append(
            f"{provider.name} offers no revocation endpoint: remove the app's access in the "
            "account's security settings to end the grant everywhere"
        )
    if await store.delete():
        done.append(f"deleted the grant from {store.location}")
    else:
        done.append("no token was stored")
    if config.oauth_refresh_token is not None:
        done.append(
            "oauth_refresh_token is still configured: the channel will use it again; remove it"
        )
    return done
