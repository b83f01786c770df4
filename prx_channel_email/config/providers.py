"""OAuth 2.0 settings: provider presets and the rules a config must satisfy.

Kept apart from the token machinery (oauth.py) so that validating a config never
imports an HTTP client: a password-only user pays nothing for OAuth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

from prx_channel_email._support.hosts import is_loopback

GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
MS_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
MS_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"


class OAuthFields(Protocol):
    """The OAuth settings this module reads (``EmailConfig`` has them).

    A protocol, not ``EmailConfig`` itself: the config imports this module to
    validate itself, so this module must not import the config.
    """

    @property
    def oauth_provider(self) -> Literal["google", "microsoft", "custom"] | None: ...
    @property
    def oauth_client_id(self) -> str | None: ...
    @property
    def oauth_tenant(self) -> str: ...
    @property
    def oauth_scopes(self) -> list[str]: ...
    @property
    def oauth_token_url(self) -> str | None: ...
    @property
    def oauth_authorize_url(self) -> str | None: ...
    @property
    def oauth_device_url(self) -> str | None: ...
    @property
    def oauth_revoke_url(self) -> str | None: ...


@dataclass(frozen=True)
class Provider:
    """Endpoints and scopes of one OAuth provider, with the fixes the doctor offers."""

    name: str
    token_url: str
    authorize_url: str | None
    device_url: str | None
    revoke_url: str | None
    scopes: tuple[str, ...]
    #: Extra query parameters of the authorization request (Google needs these to
    #: hand out a refresh token at all).
    authorize_params: tuple[tuple[str, str], ...] = ()
    #: Why the device flow cannot be used, when it cannot.
    device_refusal: str | None = None


def _microsoft(tenant: str) -> Provider:
    base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
    return Provider(
        name="microsoft",
        token_url=f"{base}/token",
        authorize_url=f"{base}/authorize",
        device_url=f"{base}/devicecode",
        revoke_url=None,  # Entra ID has no RFC 7009 endpoint for refresh tokens
        scopes=(MS_IMAP_SCOPE, MS_SMTP_SCOPE, "offline_access"),
    )


GOOGLE = Provider(
    name="google",
    token_url="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL
    authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    device_url="https://oauth2.googleapis.com/device/code",
    revoke_url="https://oauth2.googleapis.com/revoke",
    scopes=(GOOGLE_MAIL_SCOPE,),
    authorize_params=(("access_type", "offline"), ("prompt", "consent")),
    device_refusal=(
        "Google's device flow does not allow the mail scope (https://mail.google.com/); "
        "use `prx-email auth login --no-browser` instead: it prints a URL to open on any "
        "machine with a browser"
    ),
)


def provider_for(config: OAuthFields) -> Provider:
    """The provider with the config's explicit endpoints and scopes applied."""
    if config.oauth_provider == "google":
        base = GOOGLE
    elif config.oauth_provider == "microsoft":
        base = _microsoft(config.oauth_tenant)
    else:
        base = Provider(
            name="custom",
            token_url=config.oauth_token_url or "",
            authorize_url=None,
            device_url=None,
            revoke_url=None,
            scopes=(),
        )
    return Provider(
        name=base.name,
        token_url=config.oauth_token_url or base.token_url,
        authorize_url=config.oauth_authorize_url or base.authorize_url,
        device_url=config.oauth_device_url or base.device_url,
        revoke_url=config.oauth_revoke_url or base.revoke_url,
        scopes=tuple(config.oauth_scopes) or base.scopes,
        authorize_params=base.authorize_params,
        device_refusal=base.device_refusal
        if GOOGLE_MAIL_SCOPE in (config.oauth_scopes or base.scopes)
        else None,
    )


def missing_scopes(provider: Provider, granted: str | None) -> list[str]:
    """The scopes IMAP and SMTP need that ``granted`` (a token's ``scope``) lacks.

    None or "" means the server did not say (RFC 6749 5.1: scope is optional when
    it equals the request), which is taken as granted.
    """
    if not granted:
        return []
    have = set(granted.split())
    # Microsoft answers with full scope URLs or bare names, depending on the flow.
    have |= {s.rsplit("/", 1)[-1] for s in have}
    wanted = [s for s in provider.scopes if s != "offline_access"]
    return [s for s in wanted if s not in have and s.rsplit("/", 1)[-1] not in have]


def _url_problem(field: str, url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return None  # a local test server never leaves the machine
    return f"{field}: must be an https:// URL (http only to a loopback host)"


def oauth_problems(config: OAuthFields) -> list[str]:
    """What is missing or wrong in the OAuth settings (one line each, no values)."""
    problems: list[str] = []
    if config.oauth_provider is None:
        problems.append(
            "oauth_provider: required with auth_method = 'oauth2' "
            "('google', 'microsoft' or 'custom')"
        )
    if not config.oauth_client_id:
        problems.append("oauth_client_id: required with auth_method = 'oauth2'")
    if config.oauth_provider == "custom":
        if not config.oauth_token_url:
            problems.append("oauth_token_url: required with oauth_provider = 'custom'")
        if not (config.oauth_authorize_url or config.oauth_device_url):
            problems.append(
                "oauth_authorize_url: a custom provider needs oauth_authorize_url "
                "and/or oauth_device_url"
            )
    for field in (
        "oauth_token_url",
        "oauth_authorize_url",
        "oauth_device_url",
        "oauth_revoke_url",
    ):
        problem = _url_problem(field, getattr(config, field))
        if problem:
            problems.append(problem)
    if config.oauth_provider == "microsoft" and not config.oauth_tenant.strip():
        problems.append("oauth_tenant: must not be empty")
    return problems
