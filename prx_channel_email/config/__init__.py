"""Configuration: the ``[channels_config.email]`` table of a framework's config.toml.

Three ways in, one validation:

* ``load_config(path)`` reads the TOML table; environment variables named
  ``PRX_EMAIL_<FIELD>`` (e.g. ``PRX_EMAIL_PASSWORD``) override it, so secrets can
  stay out of the file;
* ``EmailConfig.from_table(table)``: a host framework's own table (snake_case or
  camelCase keys), with the environment overriding it the same way;
* ``EmailConfig(**kwargs)``: values given in code win over the environment (what
  a program says explicitly is not silently replaced); the environment still
  fills the fields not given.

The environment is read by pydantic-settings (the design card's choice): the
``PRX_EMAIL_*`` variables and nothing else (no .env file, no command line, no
secrets directory).

Every problem becomes one :class:`ConfigError` that names each bad field (and the
file), and never echoes a value back (a value might be a password).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import socket
import ssl
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from prx_channel_email._mail.addresses import fold_address
from prx_channel_email._support.hosts import is_loopback as is_loopback
from prx_channel_email._support.hosts import plaintext_allowed
from prx_channel_email.config.providers import oauth_problems, provider_authserv_ids
from prx_channel_email.errors import ConfigError

ENV_PREFIX = "PRX_EMAIL_"
TABLE = ("channels_config", "email")
# A config file is a few KB; anything bigger is a mistake (or /dev/zero).
MAX_CONFIG_BYTES = 1024 * 1024

# While a table (file or host) is validated: the environment wins, errors name the file.
_ENV_OVERRIDES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "prx_email_env_overrides", default=False
)
_TABLE_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "prx_email_table_path", default=None
)
# While an account of an ``accounts`` table is validated: its own PRX_EMAIL_<NAME>__*
# variables (field -> text), which win over the general ones (config/accounts.py).
_ACCOUNT_ENV: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "prx_email_account_env", default=None
)

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

# Deliberately loose: the server decides what it delivers to. This only catches
# values that cannot be an address at all (no @, spaces, empty parts).
_ADDRESS_RE = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;.]+$|^[^@\s<>,;]+@localhost$")
_DOMAIN_RE = re.compile(r"^@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")

DEFAULT_ATTACHMENT_TYPES = [
    "text/plain",
    "text/csv",
    "text/markdown",
    "application/pdf",
    "application/json",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "prx-channel-email"


def default_replica_id() -> str:
    """This process, as logs, metrics and ``mailboxes()`` name it: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


# What an account may do (``capabilities``); all of them unless the config says less.
CAPABILITIES = ("receive", "reply", "send", "tools")


def mask_url(url: str) -> str:
    """``url`` with the password of its userinfo (``user:password@``) masked."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):[^@/]*@", r"\1:********@", url)


def is_address(value: str) -> bool:
    return bool(_ADDRESS_RE.match(value))


def sender_entry(value: str) -> str | None:
    """An ``allowed_senders`` entry in its stored form, or None when it is none of
    an address, ``@domain`` or ``*`` (the config and ``allow_sender`` share this)."""
    item = fold_address(value)
    if item == "*" or _DOMAIN_RE.match(item) or is_address(item):
        return item
    return None


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string (handy in env variables)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


# NoDecode: pydantic-settings hands the variable's text to _split_list (JSON or
# comma-separated) instead of insisting on JSON itself.
StrList = Annotated[list[str], NoDecode]


class EmailConfig(BaseSettings):
    """Settings of one email account. Field names and defaults follow the reference channel."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,  # PRX_EMAIL_PASSWORD or prx_email_password, the shell's habit
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        validate_default=True,
        # PRX_EMAIL_CA_FILE= (as a compose file or a shell leaves it) means "not set",
        # not "the current directory".
        env_ignore_empty=True,
    )

    # --- the account (the reference channel's fields: names and defaults fixed) ---
    imap_host: str = Field(description="Host name of the IMAP server mail is received from.")
    imap_port: Port = Field(
        993,
        description=(
            "IMAP port: 993 for implicit TLS, 143 for STARTTLS (set `imap_security` to match)."
        ),
    )
    imap_folder: str = Field("INBOX", description="The folder watched for new mail.")
    smtp_host: str = Field(description="Host name of the SMTP server replies are sent through.")
    smtp_port: Port = Field(465, description="SMTP port: 465 for implicit TLS, 587 for STARTTLS.")
    smtp_tls: bool = Field(
        True,
        description=(
            "False means plaintext SMTP (loopback only unless `allow_insecure`); read "
            'when `smtp_security` is "auto".'
        ),
    )
    username: str = Field(
        description="Login name of the account (IMAP, and SMTP unless `smtp_username` is set)."
    )
    # Before password: its validator needs to know whether a password is wanted.
    auth_method: Literal["password", "oauth2"] = Field(
        "password",
        description=(
            '"password" (LOGIN / AUTH with `password`) or "oauth2" (XOAUTH2 / OAUTHBEARER'
            " with a token from `prx-email auth login`)."
        ),
    )
    password: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description=(
            'Password or app password; required unless `auth_method` is "oauth2". A '
            "secret: better set PRX_EMAIL_PASSWORD than the file."
        ),
    )
    from_address: str = Field(description="The From address of every mail the channel sends.")
    idle_timeout_secs: PositiveInt = Field(
        1740, description="Longest IDLE before it is re-issued (RFC 2177 advises under 30 minutes)."
    )
    allowed_senders: StrList = Field(
        default_factory=list,
        description='Who may reach the agent: addresses, "@domain" or "*"; empty means nobody.',
    )
    default_subject: str = Field(
        "PRX Message", description='Subject of a new conversation (replies use "Re: ...").'
    )

    # --- connection security ---
    imap_security: Literal["tls", "starttls", "plain"] = Field(
        "tls",
        description=(
            '"tls" (implicit TLS), "starttls" (upgrade, never a silent fallback) or '
            '"plain" (loopback only unless `allow_insecure`).'
        ),
    )
    smtp_security: Literal["auto", "tls", "starttls", "plain"] = Field(
        "auto",
        description='"auto" (from `smtp_port` and `smtp_tls`), "tls", "starttls" or "plain".',
    )
    allow_insecure: bool = Field(
        False,
        description=(
            "Allow plaintext to a host that is not loopback (sends the password in the clear)."
        ),
    )
    ca_file: Path | None = Field(
        None,
        description=(
            "A PEM file with an extra CA to trust (self-signed servers, Proton Mail "
            "Bridge); certificates are always verified."
        ),
    )
    smtp_username: str | None = Field(
        None, description="SMTP login name, when it differs from `username`."
    )
    smtp_password: SecretStr | None = Field(
        None,
        description=(
            "SMTP password, when it differs from `password` (a secret: better "
            "PRX_EMAIL_SMTP_PASSWORD)."
        ),
    )
    connect_timeout_secs: PositiveFloat = Field(
        20.0, description="Budget for TCP connect, TLS handshake and greeting, in seconds."
    )
    command_timeout_secs: PositiveFloat = Field(
        60.0, description="Budget for any single IMAP or SMTP command, in seconds."
    )

    # --- OAuth 2.0 (auth_method = "oauth2"; see oauth.py) ---
    oauth_provider: Literal["google", "microsoft", "custom"] | None = Field(
        None,
        description=(
            '"google" or "microsoft" (endpoints and scopes preset) or "custom" (give the '
            'URLs); with `auth_method = "oauth2"`.'
        ),
    )
    oauth_client_id: str | None = Field(
        None, description="The OAuth client (application) id of your app registration."
    )
    oauth_client_secret: SecretStr | None = Field(
        None,
        description=(
            'The OAuth client secret, for clients that have one (Google "Desktop app"). A secret.'
        ),
    )
    oauth_tenant: str = Field(
        "common",
        description='Microsoft only: "organizations", "common", "consumers" or a tenant id.',
    )
    oauth_scopes: StrList = Field(
        default_factory=list,
        description=(
            "Scopes to request; empty means the provider's preset (IMAP and SMTP access, offline)."
        ),
    )
    oauth_token_url: str | None = Field(
        None, description="Token endpoint (preset for google and microsoft; required for custom)."
    )
    oauth_authorize_url: str | None = Field(
        None, description="Browser sign-in endpoint (custom provider; preset otherwise)."
    )
    oauth_device_url: str | None = Field(
        None, description="Device-code endpoint, RFC 8628 (custom provider; preset for microsoft)."
    )
    oauth_revoke_url: str | None = Field(
        None,
        description=(
            "Revocation endpoint, RFC 7009, used by `prx-email auth logout` (custom provider)."
        ),
    )
    oauth_refresh_token: SecretStr | None = Field(
        None,
        description=(
            "A refresh token that seeds the token store; a different value later replaces"
            " the stored grant. A secret: better PRX_EMAIL_OAUTH_REFRESH_TOKEN."
        ),
    )
    oauth_redirect_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0, description="Port on 127.0.0.1 for the browser sign-in's redirect; 0 picks a free one."
    )

    # --- inbound transport ---
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description=(
            "Directory of the state (cursor, ledger, in-flight mail, outbox, OAuth "
            "tokens), owner-only; default `$XDG_STATE_HOME/prx-channel-email`, i.e. "
            "`~/.local/state/prx-channel-email`."
        ),
    )
    keepalive_secs: PositiveInt = Field(
        240,
        description=(
            "Without news for this long the connection is checked (DONE + NOOP), so a "
            "silently dead link is noticed."
        ),
    )
    poll_interval_secs: PositiveInt = Field(
        60, description="Polling interval on a server without IDLE."
    )
    initial_sync: Literal["new", "unseen"] = Field(
        "new",
        description=(
            'First start: "new" hands on only mail arriving from now on, "unseen" also '
            "the unread mail already in the folder."
        ),
    )
    # "ack": handed-on mail stays in flight until channel.ack(msg) or a reply to it,
    # and comes again after a restart; "queue": handled once it is on the queue.
    handoff: Literal["ack", "queue"] = Field(
        "ack",
        description=(
            '"ack": a message stays in flight until acknowledged (or replied to) and '
            'comes again after a restart; "queue": done once on the queue.'
        ),
    )
    mark_seen: bool = Field(
        False, description='Flag delivered mail \\Seen (with `handoff = "ack"` once acknowledged).'
    )
    move_to_folder: str | None = Field(
        None,
        description=(
            'Move delivered mail to this folder (with `handoff = "ack"` once acknowledged).'
        ),
    )
    max_message_bytes: PositiveInt = Field(
        25 * 1024 * 1024,
        description=(
            "Mail bigger than this is not downloaded; an allowed sender's agent gets a "
            "short notice."
        ),
    )
    fetch_batch_size: Annotated[int, Field(ge=1, le=500)] = Field(
        50, description="Most messages fetched per IMAP command while catching up."
    )

    # --- inbound policy ---
    trusted_authserv_ids: StrList = Field(
        default_factory=list,
        description=(
            "Authserv-ids whose topmost Authentication-Results field is believed; preset "
            'from `imap_host` for Gmail and Microsoft. "*.example.net" and "@none" are '
            "allowed."
        ),
    )
    sender_auth: Literal["off", "flag", "enforce"] = Field(
        "enforce",
        description=(
            '"enforce" refuses mail no trusted server verified, "flag" only sets '
            '`sender_verified`, "off" does not evaluate.'
        ),
    )
    own_addresses: StrList = Field(
        default_factory=list,
        description=(
            "Further addresses of the bot; mail from them is never handed on (loop guard)."
        ),
    )
    # Rate limits defer, never drop (ratelimit.py; docs/concepts/what-the-agent-sees.md).
    rate_limit_count: PositiveInt = Field(
        30,
        description=(
            "At most this many messages per sender are handed on per window; more waits, "
            "never dropped."
        ),
    )
    rate_limit_window_secs: PositiveInt = Field(
        3600, description="The sliding window of the rate limits, in seconds."
    )
    domain_rate_limit_count: PositiveInt = Field(
        100,
        description=(
            "The same limit for all senders of one domain together (never below "
            "`rate_limit_count`)."
        ),
    )
    loop_reply_secs: PositiveFloat = Field(
        30.0,
        description=(
            "An answer arriving this soon after the bot's reply is a quick answer (a "
            "robot, not a person)."
        ),
    )
    loop_max_quick_replies: PositiveInt = Field(
        3,
        description=(
            "More quick answers than this from one sender or thread within "
            "`loop_window_secs` are held."
        ),
    )
    loop_window_secs: PositiveInt = Field(
        3600,
        description=(
            "Window for counting quick answers; held mail goes on after this long without one."
        ),
    )
    # Nothing reads a refused mail's ledger row back (the UID cursor, not the ledger,
    # keeps it from being fetched again); kept a while for the operator, then pruned
    # with the outbox's housekeeping (at start, then hourly). docs/concepts/storage.md.
    refused_retention_days: Annotated[float, Field(ge=0)] = Field(
        30,
        description=(
            "Days the state keeps its record of a refused mail, then prunes it (at start, "
            "then hourly). Refused mail does not come again: the UID cursor is past it."
        ),
    )

    # --- attachments ---
    attachments_dir: Path | None = Field(
        None, description="Where attachments are saved; default `<state_dir>/attachments`."
    )
    max_attachment_bytes: PositiveInt = Field(
        10 * 1024 * 1024, description="Bigger attachments are listed but not saved."
    )
    max_attachments_total_bytes: PositiveInt = Field(
        25 * 1024 * 1024, description="Most bytes of saved attachments per message."
    )
    attachment_types: StrList = Field(
        default_factory=lambda: list(DEFAULT_ATTACHMENT_TYPES),
        description=(
            'Content types that are saved: exact types, "image/*" or "*"; others are '
            "listed with a skipped reason."
        ),
    )

    # --- outbound ---
    from_name: str | None = Field(None, description="Display name in the From of sent mail.")
    send_max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        40,
        description=(
            "Attempts for a reply that meets temporary failures before it is marked failed."
        ),
    )
    send_retry_max_secs: PositiveInt = Field(
        900,
        description=(
            "Longest wait between two attempts; also how long sends pause after a refused"
            " SMTP login."
        ),
    )
    max_outbound_attachment_bytes: PositiveInt = Field(
        20 * 1024 * 1024,
        description="Most bytes of attachments of one sent message; more is refused by `send()`.",
    )
    # Reply text (UTF-8 bytes) above this is refused: too_large. An echo of a huge
    # mail must not cost gigabytes of memory and seconds of Markdown rendering.
    max_outbound_bytes: PositiveInt = Field(
        1_000_000, description="Reply text (UTF-8 bytes) above this is refused with `too_large`."
    )
    # Sent replies keep their stored text this many days (idempotency needs only
    # the key and the Message-ID, which stay). Pruned at start and hourly.
    outbox_retention_days: Annotated[float, Field(ge=0)] = Field(
        7,
        description=(
            "Days a sent reply's text is kept in the outbox (its Message-ID and "
            "idempotency key stay)."
        ),
    )
    save_sent: bool = Field(
        False, description="Also store each sent reply in the Sent folder (best effort)."
    )
    sent_folder: str | None = Field(
        None,
        description=(
            "The Sent folder for `save_sent`; default the folder marked \\Sent (SPECIAL-"
            'USE), else "Sent".'
        ),
    )

    # --- several mailboxes (config/accounts.py; docs/guides/accounts.md) ---
    # Each folder is a mailbox of its own (own session, cursor, backoff); [] means
    # [imap_folder]. More folders than max_imap_connections is refused: each holds a
    # connection, and providers cap them per account (docs/guides/provider-limits.md).
    imap_folders: StrList = Field(
        default_factory=list,
        description=(
            "The folders this account watches, each a mailbox of its own (session, "
            "cursor, backoff); empty means `[imap_folder]`."
        ),
    )
    max_imap_connections: Annotated[int, Field(ge=1, le=1000)] = Field(
        10,
        description=(
            "Most IMAP connections this account may hold, one per watched folder; more "
            "folders is a config error."
        ),
    )
    capabilities: StrList = Field(
        default_factory=lambda: list(CAPABILITIES),
        description=(
            'What the account may do: a subset of "receive", "reply", "send", "tools"; a '
            'send without "reply"/"send" fails with `capability_disabled`.'
        ),
    )
    # The share of senders (stable hash of the address) whose mail is handed on.
    rollout_percent: Annotated[float, Field(ge=0, le=100)] = Field(
        100,
        description=(
            "Share of senders (a stable hash of the address) whose mail is handed on; the"
            " others' mail is left untouched, logged and counted."
        ),
    )

    # --- service-wide: the top-level table only (accounts.SERVICE_FIELDS) ---
    state_url: SecretStr | None = Field(
        None,
        description=(
            "Shared state in PostgreSQL (`postgresql://user:password@host:port/dbname`) "
            "for replicas; none means SQLite in `state_dir`. A secret. Service-wide."
        ),
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        0,
        description=(
            "Port of the operations endpoint (/metrics, /healthz, /status); 0 turns it "
            "off. Service-wide."
        ),
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the operations endpoint listens on. Service-wide."
    )
    replica_id: str = Field(
        default_factory=default_replica_id,
        description=(
            "Names this process in logs, metrics and `mailboxes()`; default host name and"
            " process id. Service-wide."
        ),
    )
    lease_secs: PositiveFloat = Field(
        30.0,
        description=(
            "How long a replica's lease on a mailbox lasts; a dead replica's mailboxes "
            "move within about this plus 15 s. Service-wide."
        ),
    )
    # Logins in progress at once per IMAP server (host and port), over all accounts.
    max_concurrent_logins: Annotated[int, Field(ge=1, le=1000)] = Field(
        10,
        description=(
            "Logins in progress at once per IMAP server (host and port), over all "
            "accounts. Service-wide."
        ),
    )

    # --- mailbox tools for the agent (channel.tools, `prx-email mcp`; docs/guides/tools.md) ---
    # "allowed": the tools see only mail the channel itself would hand on; "all": opt-out.
    tools_scope: Literal["allowed", "all"] = Field(
        "allowed",
        description=(
            'Which mail the agent\'s mailbox tools see: "allowed" (only mail the channel '
            'would hand on) or "all".'
        ),
    )
    # mark_read / move / send / reply refuse (tools_read_only) unless this is true.
    tools_write: bool = Field(
        False,
        description=(
            "Allow the tools' write actions (mark_read, move, send, reply); otherwise "
            "they fail with `tools_read_only`."
        ),
    )
    # Every text a tool returns from mail is cut at this many characters, with a marker.
    tools_max_chars: Annotated[int, Field(ge=100, le=1_000_000)] = Field(
        20_000,
        description="Longest text field in a tool result; longer text is cut with a marker.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Earlier sources win. A table (file or host) yields to the environment,
        where the secrets live; arguments given in code win over it. No .env file
        and no secrets directory: the variables are the only other source."""
        account_env = _ACCOUNT_ENV.get()
        if account_env is not None:  # an account of load_accounts: its own variables first
            return (_Values(settings_cls, account_env), env_settings, init_settings)
        if _ENV_OVERRIDES.get():
            return (env_settings, init_settings)
        return (init_settings, env_settings)

    def __init__(self, **values: Any) -> None:
        """Validate; every problem (bad value, missing field, bad env override) is a ConfigError."""
        # BaseSettings would take "_env_file", "_cli_parse_args", "_secrets_dir" ...
        # as options for itself: here no field starts with "_", so they are unknown
        # fields like any other (reported after the value errors, as pydantic does).
        options = [f"{key}: unknown field (check the spelling)" for key in values if key[:1] == "_"]
        where = _TABLE_PATH.get()
        try:
            super().__init__(**{k: v for k, v in values.items() if k[:1] != "_"})
        except ValidationError as exc:
            raise _invalid(exc, where, options) from None
        except SettingsError as exc:  # a variable pydantic-settings itself could not decode
            raise _config_error(where, [_settings_problem(exc), *options]) from None
        if options:
            raise _config_error(where, options) from None

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None
    ) -> EmailConfig:
        """Validate a host framework's table: snake_case or camelCase keys, the
        environment overriding it as it overrides a file; ``path`` only names the
        source in errors. Unknown keys are refused (a typo must not go unnoticed)."""
        shown = str(path) if path is not None else None
        data = _snake_keys(table, shown)
        with _from_table(shown):
            return cls(**data)

    @model_validator(mode="before")
    @classmethod
    def _preset_trust(cls, data: Any) -> Any:
        # A known provider's id is trusted unless the config says otherwise
        # (an explicit list, even an empty one, wins).
        if isinstance(data, dict) and "trusted_authserv_ids" not in data:
            host = data.get("imap_host")
            preset = provider_authserv_ids(host) if isinstance(host, str) else []
            if preset:
                data = {**data, "trusted_authserv_ids": preset}
        return data

    @field_validator(
        "allowed_senders",
        "trusted_authserv_ids",
        "own_addresses",
        "attachment_types",
        "oauth_scopes",
        "imap_folders",
        "capabilities",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator(
        "imap_host", "smtp_host", "username", "imap_folder", "metrics_host", "replica_id"
    )
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("auth_method") == "oauth2":
            return value if value is not None and value.get_secret_value() else None
        if value is None or not value.get_secret_value():
            raise ValueError(f"required (set it in the file or in {ENV_PREFIX}PASSWORD)")
        return value

    @field_validator(
        "imap_host", "smtp_host", "username", "imap_folder",
        "default_subject", "from_name", "sent_folder", "move_to_folder",
    )  # fmt: skip
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        # These end up in mail headers or protocol commands: a line break would inject.
        if value is not None and any(ch in value for ch in "\r\n\x00"):
            raise ValueError("must not contain line breaks or NUL")
        return value

    @field_validator("imap_folders")
    @classmethod
    def _folders(cls, value: list[str]) -> list[str]:
        folders = [f.strip() for f in value]
        problems = []
        if any(not f for f in folders):
            problems.append("a folder name must not be empty")
        if any(ch in f for f in folders for ch in "\r\n\x00"):
            problems.append("a folder name must not contain line breaks or NUL")
        # INBOX is case-insensitive (RFC 3501); other names are the server's business.
        keys = [f.upper() if f.upper() == "INBOX" else f for f in folders]
        twice = sorted({f for f, k in zip(folders, keys, strict=True) if keys.count(k) > 1})
        if twice:
            problems.append(f"{', '.join(map(repr, twice))} listed twice")
        if problems:
            raise ValueError("; ".join(problems))
        return folders

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: list[str]) -> list[str]:
        wanted = [c.strip().lower() for c in value]
        bad = [c for c in wanted if c not in CAPABILITIES]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))} unknown; choose from {', '.join(CAPABILITIES)}"
            )
        return [c for c in CAPABILITIES if c in wanted]  # one order, no repeats

    @field_validator("from_address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if not is_address(value):
            raise ValueError("is not an email address")
        return value

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        cleaned: list[str] = []
        bad: list[str] = []
        for entry in value:
            item = sender_entry(entry)
            if item is not None:
                cleaned.append(item)
            else:
                bad.append(entry)
        if bad:
            shown = ", ".join(repr(b) for b in bad)
            raise ValueError(
                f"entries {shown} are neither an address, '@domain' nor '*'"
                if len(bad) > 1
                else f"entry {shown} is neither an address, '@domain' nor '*'"
            )
        return cleaned

    @field_validator("own_addresses")
    @classmethod
    def _own(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not is_address(v.strip())]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} not an email address")
        return [fold_address(v) for v in value]

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        path = value.expanduser()
        if not path.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        try:  # fail here, with the file named, rather than at every connection
            # A bare context: the system trust store is not needed to read one file.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(
                f"file {str(value)!r} holds no usable PEM certificate ({exc.__class__.__name__})"
            ) from None
        return path

    @model_validator(mode="after")
    def _mailboxes(self) -> EmailConfig:
        if not self.imap_folders:  # the reference field names the one folder
            object.__setattr__(self, "imap_folders", [self.imap_folder])
        if len(self.imap_folders) > self.max_imap_connections:
            raise ValueError(
                f"imap_folders: {len(self.imap_folders)} folders need as many IMAP "
                f"connections, more than max_imap_connections ({self.max_imap_connections}); "
                "providers cap connections per account (Gmail: 15)"
            )
        return self

    @model_validator(mode="after")
    def _security(self) -> EmailConfig:
        problems: list[str] = []
        if self.imap_security == "plain" and not self.plaintext_allowed(self.imap_host):
            problems.append(
                "imap_security: 'plain' sends the password unencrypted to "
                f"{self.imap_host}; use 'tls' or 'starttls', or set allow_insecure = true"
            )
        if self.smtp_effective_security == "plain" and not self.plaintext_allowed(self.smtp_host):
            problems.append(
                "smtp_security: plaintext SMTP to "
                f"{self.smtp_host} is refused; use port 465/587 with TLS, "
                "or set allow_insecure = true"
            )
        if self.auth_method == "oauth2":
            problems.extend(oauth_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived values ---
    def plaintext_allowed(self, host: str) -> bool:
        """Plaintext may carry the password only on this machine, or by explicit opt-in."""
        return plaintext_allowed(host, self.allow_insecure)

    @property
    def smtp_effective_security(self) -> Literal["tls", "starttls", "plain"]:
        """Resolve ``smtp_security = "auto"`` from the reference fields smtp_port/smtp_tls."""
        if self.smtp_security != "auto":
            return self.smtp_security
        if not self.smtp_tls:
            return "plain"
        return "tls" if self.smtp_port == 465 else "starttls"

    @property
    def account(self) -> str:
        """A stable key for this account in state and logs (no secret in it)."""
        return f"{self.username}@{self.imap_host}:{self.imap_port}"

    @property
    def attachments_path(self) -> Path:
        return self.attachments_dir or (self.state_dir / "attachments")

    @property
    def smtp_login(self) -> tuple[str, str]:
        user = self.smtp_username or self.username
        secret = self.smtp_password or self.password
        return user, secret.get_secret_value() if secret is not None else ""

    @property
    def imap_login(self) -> tuple[str, str]:
        return self.username, self.password.get_secret_value() if self.password else ""

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret masked (for `prx-email config`)."""
        data = self.model_dump(mode="json")
        for key in ("password", "smtp_password", "oauth_client_secret", "oauth_refresh_token"):
            if data.get(key) is not None:
                data[key] = "********"
        if self.state_url is not None:  # the URL is useful to see, its password is not
            data["state_url"] = mask_url(self.state_url.get_secret_value())
        data["smtp_effective_security"] = self.smtp_effective_security
        return data


@contextlib.contextmanager
def _from_table(path: str | None, *, account_env: dict[str, str] | None = None) -> Iterator[None]:
    """While a table is validated: the environment overrides it (an account's own
    variables first), and errors name ``path``."""
    overrides = _ENV_OVERRIDES.set(True)
    where = _TABLE_PATH.set(path)
    own = _ACCOUNT_ENV.set(account_env)
    try:
        yield
    finally:
        _ACCOUNT_ENV.reset(own)
        _TABLE_PATH.reset(where)
        _ENV_OVERRIDES.reset(overrides)


class _Values(PydanticBaseSettingsSource):
    """A settings source of fixed values (an account's own environment variables)."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, str]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("PRX_CONFIG")
    return Path(env).expanduser() if env else Path("config.toml")


def _describe(err: dict[str, Any]) -> list[str]:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "missing":
        return [f"{loc}: required field is missing"]
    if kind == "extra_forbidden":
        return [f"{loc}: unknown field (check the spelling)"]
    if not loc:  # a cross-field check: its message already starts with the field names
        return msg.split("; ")
    return [f"{loc}: {msg}"]


def _invalid(exc: ValidationError, path: str | None, more: list[str] | None = None) -> ConfigError:
    problems = [line for e in exc.errors(include_input=False) for line in _describe(dict(e))]
    return _config_error(path, problems + (more or []))


def _config_error(path: str | None, problems: list[str]) -> ConfigError:
    where = f" in {path}" if path else ""
    return ConfigError(
        f"invalid email configuration{where}:\n  - " + "\n  - ".join(problems),
        path=path,
        problems=problems,
    )


_SETTINGS_FIELD_RE = re.compile(r'field "([^"]+)"')


def _settings_problem(exc: SettingsError) -> str:
    """pydantic-settings names the field in its message; the value (and the
    decoder's complaint about it, in ``__cause__``) is left out: it may be a secret."""
    found = _SETTINGS_FIELD_RE.search(str(exc))
    if found is None:
        return f"{ENV_PREFIX}*: a variable could not be decoded"
    name = found.group(1)
    return f"{name}: {ENV_PREFIX}{name.upper()} could not be decoded"


_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _snake_keys(table: Mapping[str, Any], path: str | None) -> dict[str, Any]:
    """``imapHost`` -> ``imap_host`` for known fields; other keys are kept as written,
    so the error names them the way the host spelled them."""
    where = f" in {path}" if path else ""
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"invalid email configuration{where}: expected a table of settings,"
            f" got {type(table).__name__}",
            path=path,
        )
    fields = EmailConfig.model_fields
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in table.items():
        if not isinstance(key, str):
            problems.append(f"{key!r}: keys must be strings")
            continue
        name = key
        if name not in fields:
            snake = _CAMEL_RE.sub("_", key).lower()
            if snake in fields:
                name = snake
        if name in out:
            problems.append(f"{name}: given twice (as {name} and as {key})")
            continue
        out[name] = value
    if problems:
        raise ConfigError(
            f"invalid email configuration{where}:\n  - " + "\n  - ".join(problems),
            path=path,
            problems=problems,
        )
    return out


def config_from_table(table: Mapping[str, Any], *, path: str | None = None) -> EmailConfig:
    """Same as :meth:`EmailConfig.from_table` (kept for existing callers)."""
    return EmailConfig.from_table(table, path=path)


def _read_config_file(file: Path) -> bytes:
    """The file's bytes; only a regular file, at most MAX_CONFIG_BYTES.

    Opened non-blocking and checked on the open descriptor: a FIFO must not hang
    the command, a device such as /dev/zero must not be read forever.
    """
    shown = str(file)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(file, flags)
    except FileNotFoundError:
        raise ConfigError(f"config file {shown} not found", path=shown) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror}", path=shown) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ConfigError(f"config file {shown} is {kind}", path=shown)
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {shown} is larger than {MAX_CONFIG_BYTES // 1024} KB", path=shown
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:  # st_size can lie (/proc): bound the read itself
            chunk = os.read(fd, 64 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {shown} is larger than {MAX_CONFIG_BYTES // 1024} KB", path=shown
            )
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {shown}: {exc.strerror}", path=shown) from None
    finally:
        os.close(fd)


def read_table(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], str]:
    """The ``[channels_config.email]`` table of ``path`` (``$PRX_CONFIG``, ``./config.toml``)
    and the file's name as errors show it."""
    file = resolve_path(path)
    shown = str(file)
    raw = _read_config_file(file)
    import tomllib  # only for a file: a host building its config in code never needs it

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown} is not UTF-8 text", path=shown) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error in {shown}: {exc}", path=shown) from None
    table: Any = doc
    for key in TABLE:
        table = table.get(key) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(
            f"{shown} has no [{'.'.join(TABLE)}] table",
            path=shown,
            problems=[f"[{'.'.join(TABLE)}]: table is missing"],
        )
    return table, shown


def load_config(path: str | os.PathLike[str] | None = None) -> EmailConfig:
    """Read ``[channels_config.email]`` from ``path``, ``$PRX_CONFIG`` or ``./config.toml``.

    A file with an ``accounts`` table yields its account when it has exactly one;
    with several, :func:`load_accounts` is the way to read them (ConfigError here).
    """
    table, shown = read_table(path)
    if ACCOUNTS_KEY in table:
        accounts = accounts_from_table(table, path=shown)
        if len(accounts) == 1:
            return next(iter(accounts.values()))
        raise ConfigError(
            f"{shown} configures {len(accounts)} accounts ({', '.join(accounts)}):"
            " load_accounts() reads them all",
            path=shown,
            problems=[f"{ACCOUNTS_KEY}: {len(accounts)} accounts where one was expected"],
        )
    return EmailConfig.from_table(table, path=shown)


# --- several accounts: [channels_config.email.accounts.NAME] tables ---
#
# Several accounts in one config: ``[channels_config.email.accounts.NAME]`` tables.
#
# Each account table inherits every key it does not set from the top-level table
# (the shared defaults). The environment overrides the file, the more specific
# variable first::
#
#     PRX_EMAIL_<NAME>__<FIELD>   one account (NAME upper-cased, "-" as "_")
#     PRX_EMAIL_<FIELD>           every account
#     [...accounts.NAME]          the account's table
#     [channels_config.email]     the shared defaults
#
# Without an ``accounts`` table the top-level table is the one account, named
# "default", exactly as before. Service-wide settings (one store, one endpoint,
# one replica identity) live in the top-level table only: an account that sets one
# differently is an error. Every problem of every account is collected into one
# :class:`ConfigError`, each line naming the account and the field, never a value.

ACCOUNTS_KEY = "accounts"
# The name of the one account of a config without an ``accounts`` table.
DEFAULT_ACCOUNT = "default"
# One value for the whole process: an account may not set them differently.
SERVICE_FIELDS = (
    "state_dir",
    "state_url",
    "metrics_port",
    "metrics_host",
    "replica_id",
    "lease_secs",
    "max_concurrent_logins",
)
# Letters and digits, single "-" or "_" between them: the name is part of variable
# names, metric labels and host chat ids, so nothing there needs quoting.
_NAME_RE = re.compile(r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*$")
MAX_NAME_CHARS = 64


def account_env_prefix(name: str) -> str:
    """``PRX_EMAIL_<NAME>__``: the prefix of the variables of account ``name``."""
    return f"{ENV_PREFIX}{name.upper().replace('-', '_')}__"


def _account_env(name: str) -> dict[str, str]:
    """The account's own variables, field name -> text (unknown names included, so a
    misspelt variable is an error rather than silently ignored). An empty one is unset,
    as for the general variables."""
    prefix = account_env_prefix(name)
    return {
        key[len(prefix) :].lower(): value
        for key, value in os.environ.items()
        if key.upper().startswith(prefix) and len(key) > len(prefix) and value != ""
    }


def load_accounts(path: str | os.PathLike[str] | None = None) -> dict[str, EmailConfig]:
    """Read every account of ``path`` (``$PRX_CONFIG``, ``./config.toml``): name -> settings.

    Without an ``accounts`` table: ``{"default": load_config(path)}``.
    """
    table, shown = read_table(path)
    return accounts_from_table(table, path=shown)


def accounts_from_table(
    table: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None
) -> dict[str, EmailConfig]:
    """The accounts of a ``[channels_config.email]`` table (a file's or a host's)."""
    shown = str(path) if path is not None else None
    if not isinstance(table, Mapping) or ACCOUNTS_KEY not in table:
        return {DEFAULT_ACCOUNT: EmailConfig.from_table(table, path=shown)}
    shared = dict(table)
    accounts = shared.pop(ACCOUNTS_KEY)
    problems: list[str] = []
    if not isinstance(accounts, Mapping) or not accounts:
        raise _config_error(shown, [f"{ACCOUNTS_KEY}: expected a table of named account tables"])
    defaults = _snake_keys(shared, shown)
    unknown = [k for k in defaults if k not in EmailConfig.model_fields]
    problems += [f"{k}: unknown field (check the spelling)" for k in unknown]
    defaults = {k: v for k, v in defaults.items() if k not in unknown}
    bad_names = _name_problems(list(accounts))
    problems += [problem for _name, problem in bad_names]

    resolved: dict[str, EmailConfig] = {}
    for name, own in accounts.items():
        where = f"{ACCOUNTS_KEY}.{name}"
        if name in dict(bad_names):
            continue
        if not isinstance(own, Mapping):
            problems.append(f"{where}: expected a table of settings")
            continue
        try:
            mine = _snake_keys(own, shown)
        except ConfigError as exc:
            problems += [f"{where}.{p}" for p in exc.problems]
            continue
        env = _account_env(str(name))
        try:
            config = _validate(name, {**defaults, **mine}, env, shown)
        except ConfigError as exc:
            problems += _attribute(exc.problems, str(name), set(mine) | set(env), set(defaults))
            # Still say which service-wide values it changes (as written in the file).
            problems += [
                _service_problem(str(name), f)
                for f in SERVICE_FIELDS
                if f in mine and mine[f] != defaults.get(f, _default(f))
            ]
            continue
        problems += _service_problems(str(name), config, defaults, mine, env, shown)
        resolved[str(name)] = config
    problems += same_login_problems(resolved)
    if problems:
        # An inherited bad value is reported once, under its own name, not per account.
        raise _config_error(shown, list(dict.fromkeys(problems)))
    return resolved


def same_login_problems(accounts: Mapping[str, EmailConfig]) -> list[str]:
    """Two accounts with one login would share their state (it is keyed by the login)
    and each send the other's queued replies: one account, several folders, instead."""
    problems = []
    first: dict[str, str] = {}
    for name, config in accounts.items():
        other = first.setdefault(config.account, name)
        if other != name:
            problems.append(
                f"{ACCOUNTS_KEY}.{name}.username: the same login on the same server as"
                f" account {other!r}; list the folders of one account in imap_folders instead"
            )
    return problems


def _validate(
    name: str, data: dict[str, Any], env: dict[str, str], shown: str | None
) -> EmailConfig:
    with _from_table(shown, account_env=env):
        return EmailConfig(**data)


def _attribute(problems: list[str], name: str, own: set[str], shared: set[str]) -> list[str]:
    """Name each problem's account: a field the account sets (in its table or its
    variables), or one nobody set (a missing required field), is the account's; a
    field only the shared table sets is reported as the shared table's."""
    out = []
    for problem in problems:
        field = problem.split(":", 1)[0].split(".", 1)[0]
        if field in shared and field not in own:
            out.append(problem)
            continue
        # The password hint names the general variable; this account has its own.
        text = problem.replace(f"{ENV_PREFIX}PASSWORD", f"{account_env_prefix(name)}PASSWORD")
        out.append(f"{ACCOUNTS_KEY}.{name}.{text}")
    return out


def _service_problems(
    name: str,
    config: EmailConfig,
    defaults: dict[str, Any],
    mine: dict[str, Any],
    env: dict[str, str],
    shown: str | None,
) -> list[str]:
    """An account may repeat a service-wide value, never change it."""
    touched = [f for f in SERVICE_FIELDS if f in mine or f in env]
    if not touched:
        return []
    plain = {k: v for k, v in {**defaults, **mine}.items() if k not in SERVICE_FIELDS}
    base = _validate(name, plain, {k: v for k, v in env.items() if k not in SERVICE_FIELDS}, shown)
    return [
        _service_problem(name, field)
        for field in touched
        if getattr(config, field) != getattr(base, field)
    ]


def _default(field: str) -> Any:
    return EmailConfig.model_fields[field].get_default(call_default_factory=True)


def _service_problem(name: str, field: str) -> str:
    return (
        f"{ACCOUNTS_KEY}.{name}.{field}: a service-wide setting (one for all accounts);"
        " set it in the top-level table only"
    )


def _name_problems(names: list[Any]) -> list[tuple[Any, str]]:
    """(name, problem) for each name that cannot be an account's."""
    problems = []
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > MAX_NAME_CHARS:
            problems.append(
                (
                    name,
                    f"{ACCOUNTS_KEY}.{name}: an account name is letters and digits, with single"
                    f" '-' or '_' between them (at most {MAX_NAME_CHARS} characters)",
                )
            )
            continue
        prefix = account_env_prefix(name)
        if prefix in seen:
            problems.append(
                (
                    name,
                    f"{ACCOUNTS_KEY}.{name}: the same variables ({prefix}*) as account"
                    f" {seen[prefix]!r}; rename one",
                )
            )
        seen[prefix] = name
    return problems


__all__ = [
    "ACCOUNTS_KEY",
    "CAPABILITIES",
    "DEFAULT_ACCOUNT",
    "ENV_PREFIX",
    "SERVICE_FIELDS",
    "EmailConfig",
    "account_env_prefix",
    "accounts_from_table",
    "config_from_table",
    "is_address",
    "is_loopback",
    "load_accounts",
    "load_config",
    "read_table",
    "resolve_path",
    "sender_entry",
]
