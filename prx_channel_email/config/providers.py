"""The provider table: everything this package knows about a mail provider, one row each.

Config (the preset trusted authserv-ids), OAuth (endpoints and scopes) and the
doctor (detecting the provider from a host, and the fix it offers for a failed
login) all read the same :data:`PROVIDERS` rows, so adding or correcting a
provider is one edit here.

Also the rules an OAuth config must satisfy. Kept apart from the token machinery
(``_oauth/tokens.py``) so that validating a config never imports an HTTP client:
a password-only user pays nothing for OAuth.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol
from urllib.parse import urlsplit

from prx_channel_email._support.hosts import is_loopback

GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
MS_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
MS_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"

#: How a person gets a new OAuth grant (the doctor and the hints below say it).
LOGIN_FIX = (
    "run `prx-email auth login` (add --device or --no-browser on a machine without a browser)"
)


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
class Server:
    """A provider's documented IMAP or SMTP endpoint."""

    host: str
    port: int
    security: Literal["tls", "starttls"]


@dataclass(frozen=True)
class OAuthEndpoints:
    """Where a grant is asked for, renewed and revoked, and the scopes it must cover.

    In the table, ``{tenant}`` in a URL stands for ``oauth_tenant`` (Microsoft);
    :func:`oauth_endpoints` fills it in and applies the config's own URLs and scopes.
    """

    name: str  # the oauth_provider value; the token store records it
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


@dataclass(frozen=True)
class Provider:
    """One mail provider: its servers, how it signs mail, its OAuth endpoints, and
    what to tell a person whose login it refused."""

    key: str  # "google", "microsoft", "custom" are also oauth_provider values
    label: str  # how people call it
    #: Domains of its hosts and addresses: a host under one of them is this provider.
    domains: tuple[str, ...] = ()
    imap: Server | None = None
    smtp: Server | None = None
    #: Further IMAP host names it answers on (its trusted authserv-ids apply there too).
    imap_aliases: tuple[str, ...] = ()
    #: Its stable Authentication-Results authserv-ids ("@none": it writes none).
    authserv_ids: tuple[str, ...] = ()
    #: A refused password login: what this provider usually wants instead of the password.
    login_hint: str | None = None
    oauth: OAuthEndpoints | None = None
    #: The mail server refused a fresh token (the grant itself is fine).
    oauth_login_hint: str = "check that username is the account that signed in, then " + LOGIN_FIX
    #: The grant is gone: the usual cause at this provider, after LOGIN_FIX.
    oauth_reauth_hint: str | None = None
    #: IMAP refused the token: what the provider requires of the mailbox and the app.
    oauth_imap_hint: str = "check that the token's account is username and that it may use IMAP"
    #: The token endpoint granted no refresh token.
    oauth_refresh_hint: str = "ask for offline access (Google: access_type=offline, prompt=consent)"

    @property
    def imap_hosts(self) -> tuple[str, ...]:
        return ((self.imap.host,) if self.imap else ()) + self.imap_aliases


GOOGLE = Provider(
    key="google",
    label="Gmail",
    domains=("gmail.com", "googlemail.com"),
    imap=Server("imap.gmail.com", 993, "tls"),
    smtp=Server("smtp.gmail.com", 465, "tls"),
    imap_aliases=("imap.googlemail.com",),
    authserv_ids=("mx.google.com",),
    login_hint=(
        "Gmail needs IMAP enabled (Settings > Forwarding and POP/IMAP) and, with 2-step "
        "verification, an app password (myaccount.google.com/apppasswords), not your "
        "normal password."
    ),
    oauth=OAuthEndpoints(
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
    ),
    oauth_login_hint=(
        "Google: username must be the account that signed in and the grant must include "
        "https://mail.google.com/; a Workspace admin may have turned IMAP off. " + LOGIN_FIX
    ),
    oauth_reauth_hint=(
        "If this keeps happening every 7 days, the app's OAuth consent "
        "screen is in 'Testing' mode: publish it (Google Cloud console > APIs & Services "
        "> OAuth consent screen > Publish app)."
    ),
    oauth_imap_hint=(
        "Google: username must be the account that signed in, and IMAP must be allowed "
        "(Workspace admins can turn it off)"
    ),
)

_MS_BASE = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"

MICROSOFT = Provider(
    key="microsoft",
    label="Outlook / Office 365",
    domains=("outlook.com", "hotmail.com", "live.com", "office365.com"),
    imap=Server("outlook.office365.com", 993, "tls"),
    smtp=Server("smtp.office365.com", 587, "starttls"),
    imap_aliases=("imap-mail.outlook.com",),
    # Outlook.com and Microsoft 365 write the field without an authserv-id.
    authserv_ids=("@none",),
    login_hint=(
        "Outlook with 2FA needs an app password; on Microsoft 365 an admin may have to "
        "enable IMAP and 'Authenticated SMTP' for the mailbox (basic auth may be disabled)."
    ),
    oauth=OAuthEndpoints(
        name="microsoft",
        token_url=f"{_MS_BASE}/token",
        authorize_url=f"{_MS_BASE}/authorize",
        device_url=f"{_MS_BASE}/devicecode",
        revoke_url=None,  # Entra ID has no RFC 7009 endpoint for refresh tokens
        scopes=(MS_IMAP_SCOPE, MS_SMTP_SCOPE, "offline_access"),
    ),
    oauth_login_hint=(
        "Microsoft 365: enable IMAP and 'Authenticated SMTP' for this mailbox (admin center "
        "> Users > the user > Mail > Manage email apps); SMTP 5.7.139 means SMTP AUTH is "
        "off for the mailbox or tenant, 5.7.30 means a password was used where OAuth is "
        "required. The app needs the delegated permissions IMAP.AccessAsUser.All and "
        "SMTP.Send with admin consent, and username must be the mailbox that signed in."
    ),
    oauth_reauth_hint=(
        "If sign-in then fails, an administrator must grant admin consent "
        "for IMAP.AccessAsUser.All and SMTP.Send (Entra admin center > App registrations "
        "> API permissions > Grant admin consent)."
    ),
    oauth_imap_hint=(
        "Microsoft: IMAP must be enabled for the mailbox, the app needs the delegated "
        "permission IMAP.AccessAsUser.All with admin consent, and username must be the "
        "mailbox that signed in"
    ),
    oauth_refresh_hint="Microsoft: include the offline_access scope",
)

YAHOO = Provider(
    key="yahoo",
    label="Yahoo",
    domains=("yahoo.com", "ymail.com"),
    imap=Server("imap.mail.yahoo.com", 993, "tls"),
    smtp=Server("smtp.mail.yahoo.com", 465, "tls"),
    login_hint="Yahoo needs an app password (Account security > Generate app password).",
)

FASTMAIL = Provider(
    key="fastmail",
    label="Fastmail",
    domains=("fastmail.com", "fastmail.fm", "messagingengine.com"),
    imap=Server("imap.fastmail.com", 993, "tls"),
    smtp=Server("smtp.fastmail.com", 465, "tls"),
    login_hint=(
        "Fastmail needs an app password with IMAP and SMTP access "
        "(Settings > Privacy & Security > App passwords)."
    ),
)

PROTON_BRIDGE = Provider(
    key="proton-bridge",
    label="Proton Mail Bridge",
    domains=("proton.me", "protonmail.com", "pm.me"),
    imap=Server("127.0.0.1", 1143, "starttls"),
    smtp=Server("127.0.0.1", 1025, "starttls"),
    login_hint=(
        "Proton Mail Bridge must be running; use the password Bridge shows for the account "
        "(not your Proton password), and trust Bridge's certificate via ca_file "
        "(export it from Bridge settings)."
    ),
)

#: Any other OAuth provider: the config names every endpoint itself.
CUSTOM = Provider(
    key="custom",
    label="custom",
    oauth=OAuthEndpoints(
        name="custom",
        token_url="",
        authorize_url=None,
        device_url=None,
        revoke_url=None,
        scopes=(),
    ),
)

#: The table, in the order host detection tries it.
PROVIDERS: tuple[Provider, ...] = (GOOGLE, MICROSOFT, YAHOO, FASTMAIL, PROTON_BRIDGE, CUSTOM)


def _host_name(host: str) -> str:
    return host.strip().rstrip(".").lower()


def provider_named(key: str | None) -> Provider:
    """The row of an ``oauth_provider`` value (the custom row for None or another name)."""
    return next((p for p in PROVIDERS if p.key == key), CUSTOM)


def detect_provider(host: str, port: int | None = None) -> Provider | None:
    """Guess the provider from a server host name (and the Bridge's loopback port)."""
    name = host.lower().rstrip(".")
    for provider in PROVIDERS:
        if any(name == d or name.endswith("." + d) for d in provider.domains):
            return provider
        if provider.imap is not None and provider.imap.host == name and not is_loopback(name):
            return provider
    bridge = PROTON_BRIDGE.imap, PROTON_BRIDGE.smtp
    if is_loopback(name) and port in {s.port for s in bridge if s is not None}:
        return PROTON_BRIDGE
    return None


def provider_authserv_ids(imap_host: str) -> list[str]:
    """The preset trusted authserv-ids for a known provider's IMAP host ([] if unknown).

    Only providers whose id is known and stable have one; others stamp per-host
    names that are not documented as stable, so they are not preset.
    """
    name = _host_name(imap_host)
    for provider in PROVIDERS:
        if provider.authserv_ids and name in provider.imap_hosts:
            return list(provider.authserv_ids)
    return []


def oauth_endpoints(config: OAuthFields) -> OAuthEndpoints:
    """The provider's OAuth endpoints with the config's explicit endpoints and scopes applied."""
    base = provider_named(config.oauth_provider).oauth
    assert base is not None  # every oauth_provider value has a row with endpoints
    tenant = config.oauth_tenant

    def url(template: str | None) -> str | None:
        return template.replace("{tenant}", tenant) if template is not None else None

    scopes = tuple(config.oauth_scopes) or base.scopes
    return replace(
        base,
        token_url=config.oauth_token_url or url(base.token_url) or "",
        authorize_url=config.oauth_authorize_url or url(base.authorize_url),
        device_url=config.oauth_device_url or url(base.device_url),
        revoke_url=config.oauth_revoke_url or url(base.revoke_url),
        scopes=scopes,
        device_refusal=base.device_refusal if GOOGLE_MAIL_SCOPE in scopes else None,
    )


def missing_scopes(endpoints: OAuthEndpoints, granted: str | None) -> list[str]:
    """The scopes IMAP and SMTP need that ``granted`` (a token's ``scope``) lacks.

    None or "" means the server did not say (RFC 6749 5.1: scope is optional when
    it equals the request), which is taken as granted.
    """
    if not granted:
        return []
    have = set(granted.split())
    # Microsoft answers with full scope URLs or bare names, depending on the flow.
    have |= {s.rsplit("/", 1)[-1] for s in have}
    wanted = [s for s in endpoints.scopes if s != "offline_access"]
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
