"""OAuth 2.0 access tokens for IMAP and SMTP: the token store and the one refresher.

Why it is built this way:

* One :class:`TokenManager` per account (:func:`token_manager`), handed explicitly to
  the IMAP listener, SMTP and the Sent-folder copy, so at most one refresh is in flight.
* A refresh happens only when a login needs a token and the cached one expires
  within the margin, or once after a login refused for the token. An idle channel
  whose IMAP session stays up asks for nothing.
* The record lives in the storage (``_storage``: a row of the state file with
  SQLite), per account. A rotated refresh token is durably saved (one transaction)
  before the new access token is handed out: a crash after that point loses
  nothing. A crash between the token endpoint's answer and the save loses the
  rotated token; whether the old one still works is the provider's policy
  (see README "OAuth": strict rotation then needs ``prx-email auth login``).
* ``invalid_grant`` marks that refresh token dead: it is retried at most
  :data:`DEAD_RETRIES` more times, spaced out, and never again until the store
  changes (a new ``auth login``) or a different seed is configured. Every login
  attempt in between costs one look at the record's version, no network, which is
  how a running channel notices a new login within seconds.
* Token endpoint outages raise :class:`OAuthUnavailable` (a TransportError) and
  are backed off here as well, so several callers do not multiply requests. A
  token request is one bounded exchange: a total deadline (httpx's timeouts are
  per read, so a slow drip would never trip them), a cap on the answer's size, and
  an answer that is not a usable Bearer token counts as an outage too. The store
  lock is therefore never held longer than that deadline.
* No token ever reaches a log line, an error message or the CLI's output.

authlib and httpx are imported only when a token is actually requested.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from prx_channel_email._storage import TokenRecord, TokenStore, storage_of
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.providers import OAuthEndpoints, oauth_endpoints, provider_named
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    OAuthReauthRequired,
    OAuthUnavailable,
    StorageError,
)

log = logging.getLogger("prx_channel_email.oauth")  # the name users filter on (was the module path)
T = TypeVar("T")

#: Refresh when less than this share of the token's lifetime is left (capped below).
MARGIN_SHARE = 0.1
MAX_MARGIN_SECS = 300.0
#: Further refresh attempts with a refresh token the server called invalid_grant.
DEAD_RETRIES = 2
DEAD_RETRY_SPACING_SECS = (600.0, 3600.0)
#: A token answer is a small JSON document; a longer one is cut off and refused.
TOKEN_ANSWER_CAP = 256 * 1024
#: The longest ``expires_in`` believed (a year): more, zero or negative is a broken answer.
MAX_EXPIRES_IN = 366 * 86400.0
#: Test hook: SIGKILL ourselves after the token endpoint answered, before saving.
KILL_BEFORE_SAVE_ENV = "PRX_EMAIL_TEST_KILL_BEFORE_TOKEN_SAVE"

#: What a host's ``token_provider`` returns: the access token and when it expires
#: (Unix seconds or an aware datetime; None = unknown, asked again before each login).
TokenProvider = Callable[[], Awaitable[tuple[str, float | datetime | None]]]


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret (to compare seeds without storing them)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def token_store(config: EmailConfig) -> TokenStore:
    """Where the token record of ``config``'s account is kept (the storage decides how)."""
    return storage_of(config).tokens(config.account, username=config.username)


@dataclass
class AccessToken:
    value: str
    expires_at: float | None
    fresh: bool  # obtained by this call (not from the cache)

    def __repr__(self) -> str:  # never show the token
        return f"AccessToken(expires_at={self.expires_at}, fresh={self.fresh})"


class TokenManager:
    """The access token of one account: cached, refreshed once at a time, persisted first."""

    def __init__(
        self,
        config: EmailConfig,
        *,
        token_provider: TokenProvider | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.provider: OAuthEndpoints = oauth_endpoints(config)
        self.store = token_store(config)
        self._host_provider = token_provider
        self._clock = clock
        self._record: TokenRecord | None = None
        self._signature: object | None = None
        self._loaded = False
        self._unsaved: TokenRecord | None = None
        self._unsaved_over: object | None = None
        self._inflight: asyncio.Future[AccessToken] | None = None
        self._refused: set[str] = set()  # fingerprints of access tokens a server refused
        # invalid_grant bookkeeping: which refresh token, how often, when next.
        self._dead: str | None = None
        self._dead_attempts = 0
        self._dead_next = 0.0
        self._outage = Backoff(base=2.0, cap=300.0)
        self._outage_until = 0.0
        self.token_requests = 0  # requests this process sent to the token endpoint
        self.reauth_required = False
        self.last_error: ChannelError | None = None

    # --- the store ---

    @property
    def seed(self) -> str | None:
        secret = self.config.oauth_refresh_token
        return secret.get_secret_value() if secret is not None else None

    def _apply_seed(self, record: TokenRecord | None) -> TokenRecord | None:
        """The configured refresh token seeds the store; a rotated token from that same
        seed wins over it, a different seed replaces the store."""
        seed = self.seed
        if not seed:
            return record
        fp = fingerprint(seed)
        if record is not None and record.seed == fp:
            return record
        return TokenRecord(
            refresh_token=seed, seed=fp, provider=self.provider.name, username=self.config.username
        )

    async def _current(self) -> TokenRecord | None:
        """The record, re-read whenever the file changed (a new login elsewhere)."""
        signature = await self.store.version()
        if self._loaded and signature == self._signature:
            return self._record
        record = await self.store.load()
        self._loaded, self._signature = True, signature
        if self._unsaved is not None and signature == self._unsaved_over:
            record = self._unsaved  # our own rotation that could not be written yet
        record = self._apply_seed(record)
        if (
            record is None
            or self._record is None
            or record.refresh_token != (self._record.refresh_token)
        ):
            self._refused.clear()
        self._record = record
        if (
            self.reauth_required
            and record is not None
            and record.refresh_token
            and (fingerprint(record.refresh_token) != self._dead)
        ):
            log_event(log, logging.INFO, "oauth.new_grant", account=self.config.account)
            self.reauth_required = False
            self.last_error = None
        return record

    async def _save(self, record: TokenRecord) -> None:
        try:
            await self.store.save(record)
        except (OSError, StorageError) as exc:
            self._unsaved, self._unsaved_over = record, self._signature
            why = exc.strerror if isinstance(exc, OSError) else exc.code
            raise ChannelError(
                f"cannot write the token store {self.store.location}: {why}",
                code="storage_error",
            ) from None
        self._unsaved = None
        self._signature = await self.store.version()
        self._record = record

    # --- tokens ---

    def margin(self, record: TokenRecord) -> float:
        lifetime = record.lifetime or 3600.0
        return min(MAX_MARGIN_SECS, lifetime * MARGIN_SHARE)

    async def token(self) -> AccessToken:
        """An access token valid for at least the margin; refreshes when needed.

        Raises OAuthReauthRequired, OAuthUnavailable, or AuthenticationError
        (the client itself is refused).
        """
        if self._host_provider is not None:
            return await self._from_host()
        record = await self._current()
        if self._unsaved is not None:
            await self._save(self._unsaved)  # never use a token whose refresh is not on disk
            record = self._record
        if record is not None and record.access_token and record.expires_at is not None:
            left = record.expires_at - self._clock()
            if left > self.margin(record) and fingerprint(record.access_token) not in self._refused:
                return AccessToken(record.access_token, record.expires_at, fresh=False)
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._refresh())
        # Shielded: one caller being cancelled must not cancel the others' refresh.
        return await asyncio.shield(self._inflight)

    async def check_grant(self) -> None:
        """Raise now, before any connection, when no token can be had (OAuthReauthRequired
        costs a stat() of the store then). A host's provider is left for the login."""
        if self._host_provider is None:
            await self.token()

    async def refresh_now(self) -> AccessToken:
        """A real refresh, whatever the cache holds (the doctor's check)."""
        if self._host_provider is not None:
            return await self._from_host()
        await self._current()
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._inflight)

    def now(self) -> float:
        return self._clock()

    def granted_scope(self) -> str | None:
        return self._record.scope if self._record is not None else None

    def refused(self, token: AccessToken) -> None:
        """A server refused ``token`` as invalid: the next :meth:`token` refreshes."""
        self._refused.add(fingerprint(token.value))

    async def _from_host(self) -> AccessToken:
        assert self._host_provider is not None
        try:
            value, expiry = await self._host_provider()
        except ChannelError:
            raise
        except Exception as exc:
            raise OAuthUnavailable(
                f"the host's token provider failed ({type(exc).__name__})"
            ) from None
        if isinstance(expiry, datetime):
            expiry = expiry.timestamp()
        return AccessToken(value, expiry, fresh=True)

    async def _refresh(self) -> AccessToken:
        now = self._clock()
        if now < self._outage_until and self.last_error is not None:
            # A copy: re-raising one object from many callers would grow its traceback.
            raise copy.copy(self.last_error).with_traceback(None)
        record = await self._current()
        refresh_token = record.refresh_token if record is not None else None
        if not refresh_token:
            self._reauth("no OAuth grant is stored for this account")
        assert refresh_token is not None and record is not None
        fp = fingerprint(refresh_token)
        if self._dead == fp and (self._dead_attempts > DEAD_RETRIES or now < self._dead_next):
            self._reauth("the OAuth grant was revoked or has expired")
        async with self.store.locked(self.config.connect_timeout_secs):
            return await self._refresh_locked(record, refresh_token)

    async def _refresh_locked(self, record: TokenRecord, refresh_token: str) -> AccessToken:
        # Another process (doctor, CLI, a second channel) may have refreshed meanwhile.
        fresh = await self.store.load()
        if (
            fresh is not None
            and self._apply_seed(fresh) is fresh
            and fresh.refresh_token != refresh_token
        ):
            self._record, self._signature = fresh, await self.store.version()
            if (
                fresh.access_token
                and fresh.expires_at
                and fresh.expires_at - self._clock() > self.margin(fresh)
                and fingerprint(fresh.access_token) not in self._refused
            ):
                return AccessToken(fresh.access_token, fresh.expires_at, fresh=True)
            record, refresh_token = fresh, fresh.refresh_token or refresh_token
        answer, expires_in = await self._request(refresh_token)
        if os.environ.get(KILL_BEFORE_SAVE_ENV) == "1":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # the crash test: answer received, not saved
        now = self._clock()
        new = replace(
            record,
            access_token=str(answer["access_token"]),
            refresh_token=str(answer.get("refresh_token") or refresh_token),
            expires_at=now + expires_in if expires_in is not None else None,
            lifetime=expires_in,
            scope=str(answer["scope"]) if answer.get("scope") else record.scope,
            provider=self.provider.name,
            username=self.config.username,
            updated_at=now,
        )
        await self._save(new)  # on disk before anyone uses the new access token
        rotated = new.refresh_token != refresh_token
        log_event(log, logging.INFO, "oauth.refreshed", account=self.config.account,
                  rotated=rotated, expires_in=expires_in)  # fmt: skip
        self._dead, self._dead_attempts = None, 0
        self._outage.reset()
        self._outage_until = 0.0
        self.reauth_required = False
        self.last_error = None
        assert new.access_token is not None
        return AccessToken(new.access_token, new.expires_at, fresh=True)

    async def _request(self, refresh_token: str) -> tuple[dict[str, Any], float | None]:
        """One refresh_token grant via authlib, bounded by :func:`token_call`; errors
        mapped to ours (no token in them). Returns the answer and its expires_in."""
        http_error = http_error_class()
        from authlib.integrations.base_client.errors import OAuthError

        self.token_requests += 1
        client = oauth_client(self.config)
        try:
            async with client:
                token = await token_call(
                    self.config,
                    client.refresh_token(self.provider.token_url, refresh_token=refresh_token),
                )
            expires_in = usable_answer(token)
        except _HttpStatus as exc:
            raise self._outage_error(f"the token endpoint answered HTTP {exc.status}") from None
        except http_error as exc:
            raise self._outage_error(
                f"the token endpoint could not be reached ({type(exc).__name__})"
            ) from None
        except OAuthError as exc:
            self._grant_error(str(exc.error or ""), refresh_token)
            raise AssertionError("unreachable") from None
        except BadTokenAnswer as exc:
            raise self._outage_error(f"the token endpoint {exc}") from None
        return dict(token), expires_in

    def _grant_error(self, error: str, refresh_token: str) -> None:
        if error == "invalid_grant":
            fp = fingerprint(refresh_token)
            if self._dead == fp:
                self._dead_attempts += 1
            else:
                self._dead, self._dead_attempts = fp, 1
            spacing = DEAD_RETRY_SPACING_SECS[
                min(self._dead_attempts - 1, len(DEAD_RETRY_SPACING_SECS) - 1)
            ]
            self._dead_next = self._clock() + spacing
            self._reauth(
                "the provider refused the stored OAuth grant (invalid_grant: "
                "revoked, expired, or a Google app still in 'Testing' mode)"
            )
        if error in ("invalid_client", "unauthorized_client"):
            exc = AuthenticationError(
                f"the token endpoint refused the OAuth client ({error}): check "
                "oauth_client_id / oauth_client_secret",
                code="oauth_client_invalid",
            )
            self.last_error = exc
            raise exc
        if error == "invalid_scope":
            exc = AuthenticationError(
                "the token endpoint refused the scopes (invalid_scope): check oauth_scopes",
                code="oauth_scope_invalid",
            )
            self.last_error = exc
            raise exc
        raise self._outage_error(f"the token endpoint refused the refresh ({error or 'error'})")

    def _reauth(self, why: str) -> None:
        exc = OAuthReauthRequired(
            f"{why}; run `prx-email auth login` to sign in again", server=self.provider.name
        )
        if not self.reauth_required:
            log_event(log, logging.ERROR, "oauth.reauth_required", exc=exc,
                      account=self.config.account, code=exc.code)  # fmt: skip
        self.reauth_required = True
        self.last_error = exc
        raise exc

    def _outage_error(self, why: str) -> OAuthUnavailable:
        delay = self._outage.next()
        self._outage_until = self._clock() + delay
        exc = OAuthUnavailable(f"{why}; retrying in {delay:.0f} s")
        self.last_error = exc
        log_event(log, logging.WARNING, "oauth.token_unavailable", exc=exc,
                  account=self.config.account, code=exc.code)  # fmt: skip
        return exc


class _HttpStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class BadTokenAnswer(Exception):
    """The token endpoint's answer came too slowly, was too big, or is not a usable
    Bearer token. The text completes "the token endpoint ..."."""


async def token_call(config: EmailConfig, call: Awaitable[T]) -> T:
    """Await one token endpoint request within a total deadline (connect_timeout_secs
    from the first byte sent to the last received; httpx only bounds each read). A
    malformed answer authlib trips over (``expires_in: 1e400`` overflows its int())
    becomes :class:`BadTokenAnswer` too."""
    deadline = config.connect_timeout_secs
    try:
        async with asyncio.timeout(deadline):
            return await call
    except TimeoutError:
        raise BadTokenAnswer(f"did not answer within {deadline:g} s") from None
    except (OverflowError, TypeError, ValueError):
        raise BadTokenAnswer("answered something that is not a token document") from None


def usable_answer(answer: Mapping[str, Any]) -> float | None:
    """Check a token answer (RFC 6749 5.1) and return its ``expires_in`` in seconds
    (None when absent): an access token, token_type Bearer (any case), and a finite
    lifetime between 1 s and :data:`MAX_EXPIRES_IN`."""
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise BadTokenAnswer("answered without an access token")
    kind = answer.get("token_type")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise BadTokenAnswer("answered a token that is not of type Bearer")
    raw = answer.get("expires_in")
    if raw is None:
        return None
    try:
        expires_in = float(raw)
    except (TypeError, ValueError, OverflowError):
        expires_in = math.nan
    if isinstance(raw, bool) or not 1.0 <= expires_in <= MAX_EXPIRES_IN:
        raise BadTokenAnswer("answered an expires_in that is not a sane number of seconds")
    return expires_in


def _capped_transport(config: EmailConfig) -> Any:
    """httpx's transport, with every answer's body capped at TOKEN_ANSWER_CAP."""
    httpx = http_module()
    cap = TOKEN_ANSWER_CAP

    class CappedStream(httpx.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __aiter__(self) -> AsyncIterator[bytes]:
            total = 0
            async for chunk in self.inner:
                total += len(chunk)
                if total > cap:
                    raise BadTokenAnswer(f"answered more than {cap} bytes")
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class Capped(httpx.AsyncBaseTransport):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport(verify=_verify(config), trust_env=False)

        async def handle_async_request(self, request: Any) -> Any:
            response = await self.inner.handle_async_request(request)
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                await response.aclose()
                raise BadTokenAnswer(f"answered more than {cap} bytes")
            return httpx.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=CappedStream(response.stream),
                extensions=response.extensions,
            )

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Capped()


def authlib_client_class() -> Any:
    """authlib's AsyncOAuth2Client, imported on first use (OAuth users only).

    authlib 1.9 warns that it prefers the httpx2 package over httpx; either works.
    """
    import authlib.deprecate  # its import adds an "always" filter: let it, then override

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", authlib.deprecate.AuthlibDeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client
    return AsyncOAuth2Client


def http_module() -> Any:
    """The HTTP client module authlib uses (httpx, or httpx2 where installed)."""
    authlib_client_class()
    try:
        from authlib.integrations.httpx_client._compat import httpx2
    except ImportError:  # pragma: no cover - older authlib
        import httpx as httpx2
    return httpx2


def http_error_class() -> type[Exception]:
    """The HTTP client error authlib raises with."""
    return http_module().HTTPError  # type: ignore[no-any-return]


def oauth_client(config: EmailConfig, **kw: Any) -> Any:
    """An authlib AsyncOAuth2Client for this config (public client when no secret).

    Every answer's body is capped (:data:`TOKEN_ANSWER_CAP`); wrap each request in
    :func:`token_call` for the total deadline. A 5xx/429 from the token endpoint
    becomes :class:`_HttpStatus` (an outage) instead of authlib trying to read an
    error document from it.
    """
    client_class = authlib_client_class()

    secret = config.oauth_client_secret
    client = client_class(
        client_id=config.oauth_client_id,
        client_secret=secret.get_secret_value() if secret is not None else None,
        token_endpoint_auth_method="client_secret_post" if secret is not None else "none",
        timeout=config.connect_timeout_secs,
        transport=_capped_transport(config),
        trust_env=False,
        **kw,
    )

    def check(resp: Any) -> Any:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _HttpStatus(resp.status_code)
        return resp

    for hook in ("access_token_response", "refresh_token_response"):
        client.register_compliance_hook(hook, check)
    return client


def _verify(config: EmailConfig) -> Any:
    if config.ca_file is None:
        return True
    import ssl

    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(config.ca_file))
    return ctx


def token_manager(
    config: EmailConfig, token_provider: TokenProvider | None = None
) -> tuple[EmailConfig, TokenManager | None]:
    """The config as the logins see it, and the one token manager every connection of
    the account must be given (None for a password login). A host that hands out
    tokens (EmailChannel's ``token_provider``) means OAuth, whatever auth_method says.

    The manager is passed to each connection explicitly; it never rides on the
    config, which is frozen settings and may be shared by several channels."""
    if token_provider is not None and config.auth_method != "oauth2":
        config = config.model_copy(update={"auth_method": "oauth2"})
    if config.auth_method != "oauth2":
        return config, None
    return config, TokenManager(config, token_provider=token_provider)


def required(tokens: TokenManager | None, what: str) -> TokenManager:
    """``tokens``, which an OAuth login cannot do without (a wiring error otherwise)."""
    if tokens is None:
        raise ValueError(f"{what}: auth_method 'oauth2' needs the account's TokenManager")
    return tokens


#: While a new sign-in is awaited, the listener looks again this often. Such a look
#: costs a stat() of the token file and no network, so a new `auth login` is picked
#: up within this time.
REAUTH_POLL_SECS = 20.0


@dataclass
class _AuthBackoff(Backoff):
    manager: TokenManager | None = None

    def next(self) -> float:
        if self.manager is not None and self.manager.reauth_required:
            return REAUTH_POLL_SECS * (0.75 + 0.25 * self._rng.random())
        return super().next()


def auth_backoff(tokens: TokenManager | None, base: float = 30.0, cap: float = 1800.0) -> Backoff:
    """The delay after a refused login: like a password's (``base`` doubling up to
    ``cap``), except while waiting for a new OAuth sign-in (see REAUTH_POLL_SECS)."""
    return _AuthBackoff(base=base, cap=cap, manager=tokens)


# --- SASL strings ---


def xoauth2(user: str, token: str) -> str:
    """The base64 XOAUTH2 initial response (Google/Microsoft's mechanism)."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


def oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The base64 OAUTHBEARER initial response (RFC 7628)."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    raw = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


def challenge_status(challenges: list[str]) -> str | None:
    """The ``status`` of a SASL error challenge (base64 JSON), e.g. "401"; None if absent."""
    for text in challenges:
        try:
            data = json.loads(base64.b64decode(text + "=" * (-len(text) % 4)))
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("status") is not None:
            return str(data["status"])
    return None


async def login_with_token(
    manager: TokenManager,
    attempt: Callable[[str], Awaitable[bool]],
    refusal: Callable[[], AuthenticationError],
) -> None:
    """Run ``attempt(token)`` (True = accepted); once more with a refreshed token when a
    cached token was refused. Raises ``refusal()`` when still refused."""
    token = await manager.token()
    if await attempt(token.value):
        return
    if not token.fresh:
        manager.refused(token)
        token = await manager.token()
        if await attempt(token.value):
            return
    manager.refused(token)
    raise refusal()


#: What SMTP refusals of a token mean at the big providers, and the fix.
SMTP_HINTS = {
    "5.7.139": (
        "Microsoft: SMTP AUTH is disabled for this mailbox or tenant; enable "
        "'Authenticated SMTP' for the mailbox (Microsoft 365 admin center > Users > Mail > "
        "Manage email apps) or Set-CASMailbox -SmtpClientAuthenticationDisabled $false"
    ),
    "5.7.30": (
        "Microsoft: Basic authentication is not supported for Client Submission; "
        "the channel must use auth_method = 'oauth2'"
    ),
    "5.7.3": "the token was refused: check the SMTP.Send permission and admin consent",
}


def smtp_hint(message: str) -> str:
    for code, hint in SMTP_HINTS.items():
        if code in message:
            return hint
    return "check that SMTP access is enabled for the mailbox and the scopes include sending"


async def smtp_login(manager: TokenManager, smtp: Any, user: str, host: str) -> None:
    """AUTH XOAUTH2 on an aiosmtplib connection to ``host`` (its auth_xoauth2 answers
    the error challenge with the empty line the protocol wants)."""
    import aiosmtplib

    offered = {m.lower() for m in smtp.server_auth_methods}
    if "xoauth2" not in offered:
        raise AuthenticationError(
            f"SMTP server {host} does not offer AUTH XOAUTH2 "
            f"(offered: {', '.join(sorted(offered)) or 'none'})",
            server=host,
            code="auth_unsupported",
        )
    last: list[str] = []

    async def attempt(token: str) -> bool:
        try:
            await smtp.auth_xoauth2(user, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            if 400 <= exc.code < 500:
                raise OAuthUnavailable(
                    f"SMTP server {host} cannot check the token now ({exc.code})",
                    host=host,
                    code="smtp_auth_transient",
                ) from None
            last[:] = [f"{exc.code} {exc.message}"]
            return False
        return True

    def refusal() -> AuthenticationError:
        said = last[0] if last else "refused"
        return AuthenticationError(
            f"SMTP server {host} refused the OAuth token for {user} ({said}); " + smtp_hint(said),
            server=host,
            code="oauth_token_refused",
        )

    await login_with_token(manager, attempt, refusal)


async def imap_login(manager: TokenManager, session: Any, user: str) -> None:
    """AUTHENTICATE XOAUTH2, or OAUTHBEARER (RFC 7628) where only that is offered."""
    caps = session.capabilities
    if "AUTH=XOAUTH2" in caps:
        mechanism, abort = "XOAUTH2", ""

        def initial(token: str) -> str:
            return xoauth2(user, token)
    elif "AUTH=OAUTHBEARER" in caps:
        mechanism, abort = "OAUTHBEARER", "AQ=="  # RFC 7628 3.2.3: a dummy %x01

        def initial(token: str) -> str:
            return oauthbearer(user, token, session.host, session.port)
    else:
        raise AuthenticationError(
            f"{session.host} offers neither AUTH=XOAUTH2 nor AUTH=OAUTHBEARER",
            server=session.host,
            code="auth_unsupported",
        )
    said: list[str] = []

    async def attempt(token: str) -> bool:
        ok, text, challenges = await session.sasl(mechanism, initial(token), abort_reply=abort)
        if not ok:
            status = challenge_status(challenges)
            said[:] = [text + (f" (status {status})" if status else "")]
        return bool(ok)

    def refusal() -> AuthenticationError:
        return AuthenticationError(
            f"{session.host} refused the OAuth token for {user} ({mechanism}): "
            f"{said[0] if said else 'refused'}; "
            + provider_named(manager.provider.name).oauth_imap_hint,
            server=session.host,
            code="oauth_token_refused",
        )

    await login_with_token(manager, attempt, refusal)
