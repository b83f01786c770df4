"""An in-process mail server for the demo: pymap (IMAP with IDLE) + aiosmtpd delivering into it.

It exists so that a new user can watch the real :class:`EmailChannel` answer an
email without owning a mail account. Everything lives in memory on loopback and
disappears with the process. Plaintext is used because the traffic never leaves
the machine (the config allows plaintext only to a loopback host).

Both servers run on the caller's event loop, so mail submitted over SMTP is in the
IMAP mailbox (and pushed to IDLE clients) before the SMTP ``250`` is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import secrets
import time
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from prx_channel_email._mail.envelope import sender_of
from prx_channel_email._mail.headers import Headers, split_header_block
from prx_channel_email.config import EmailConfig, config_from_table
from prx_channel_email.errors import ChannelError

DOMAIN = "sandbox.localhost"
# The authserv-id the sandbox's SMTP server stamps on mail it accepts (as a
# provider's MX does), and which the bot's sandbox config trusts.
AUTHSERV_ID = "mx.sandbox.localhost"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class SandboxUser:
    """A mailbox on the sandbox; ``address`` is also its IMAP/SMTP login."""

    address: str
    password: str


@dataclass
class _Inbox:
    """What arrived for one user over SMTP; lets callers wait without polling."""

    messages: list[bytes] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)


class SandboxError(ChannelError):
    """The sandbox could not start (pymap or aiosmtpd missing, no free port)."""

    code = "sandbox_unavailable"


def _pymap() -> Any:
    """Import pymap lazily: it is an optional dependency (the ``demo`` extra)."""
    try:
        from proxyprotocol.reader import ProxyProtocolReader
        from pymap.backend.dict import Config, DictBackend, Login
        from pymap.imap import IMAPServer
        from pymap.parsing.message import AppendMessage
        from pymap.user import Passwords, UserMetadata
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SandboxError(
            "the demo needs pymap and aiosmtpd: pip install 'prx-channel-email[demo]'"
        ) from exc
    return Namespace(
        Config=Config,
        DictBackend=DictBackend,
        Login=Login,
        IMAPServer=IMAPServer,
        AppendMessage=AppendMessage,
        Passwords=Passwords,
        UserMetadata=UserMetadata,
        ProxyProtocolReader=ProxyProtocolReader,
    )


class MailSandbox:
    """A throw-away IMAP + SMTP server on 127.0.0.1 with a bot and a user mailbox.

    ``bot`` is the account the channel logs in as; ``user`` plays the person who
    writes to it. SMTP accepts mail for any sandbox user without AUTH (so a tool
    like ``swaks`` can send to the bot) and checks AUTH when a client offers it;
    mail for an address outside the sandbox is refused with 550.
    """

    def __init__(
        self,
        *,
        bot: str = f"bot@{DOMAIN}",
        user: str = f"alice@{DOMAIN}",
        imap_port: int = 0,
        smtp_port: int = 0,
    ) -> None:
        self.bot = SandboxUser(bot, secrets.token_urlsafe(12))
        self.user = SandboxUser(user, secrets.token_urlsafe(12))
        self.host = HOST
        self._want_ports = (imap_port, smtp_port)
        self.imap_port = 0
        self.smtp_port = 0
        self._users: dict[str, SandboxUser] = {}
        self._inboxes: dict[str, _Inbox] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._pm: Any = None
        self._login: Any = None
        self._imap_config: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> MailSandbox:
        pm = self._pm = _pymap()
        try:
            from aiosmtpd.smtp import SMTP, Session
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SandboxError(
                "the demo needs aiosmtpd: pip install 'prx-channel-email[demo]'"
            ) from exc

        class _QuietSession(Session):
            # aiosmtpd logs a deprecation warning whenever it sets login_data itself.
            login_data = property(
                lambda self: self._login_data,
                lambda self, value: setattr(self, "_login_data", value),
            )

        class _SMTP(SMTP):
            def _create_session(self) -> Any:
                return _QuietSession(self.loop)

        class _Config(pm.Config):  # type: ignore[name-defined]
            @property
            def greeting(self) -> bytes:
                # pymap's default asks the resolver for our FQDN (a blocking DNS call).
                return b"prx-email sandbox ready"

        args = Namespace(
            debug=False,
            passlib_cfg=None,
            proxy_protocol=None,
            inherited_sockets=None,
            host=self.host,
            port=0,
        )
        config = _Config(
            args,
            host=self.host,
            port=0,
            tls_enabled=False,
            demo_data=False,
            demo_user=self.bot.address,
            demo_password=self.bot.password,
            reject_dnsbl=False,
            invalid_user_sleep=0.2,
        )
        config.apply_context()
        self._imap_config = config
        self._login = pm.Login(config)
        for account in (self.bot, self.user):
            await self.add_user(account.address, account.password)

        imap_cb = pm.ProxyProtocolReader(config.proxy_protocol).get_callback(
            pm.IMAPServer(self._login, config)
        )
        try:
            imap = await asyncio.start_server(imap_cb, self.host, self._want_ports[0])
            self._servers.append(imap)
            self.imap_port = imap.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            handler = _Delivery(self)
            smtp = await loop.create_server(
                lambda: _SMTP(
                    handler,
                    hostname=DOMAIN,
                    auth_require_tls=False,
                    authenticator=self._authenticate,
                    data_size_limit=10 * 1024 * 1024,
                    timeout=60,
                ),
                self.host,
                self._want_ports[1],
            )
            self._servers.append(smtp)
            self.smtp_port = smtp.sockets[0].getsockname()[1]
        except OSError as exc:
            await self.close()
            raise SandboxError(f"cannot listen on {self.host}: {exc.strerror}") from exc
        return self

    async def close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        if self._imap_config is not None:
            pool = getattr(self._imap_config.cpu_subsystem, "_executor", None)
            if pool is not None:
                pool.shutdown(wait=False)

    async def __aenter__(self) -> MailSandbox:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ users and mail

    async def add_user(self, address: str, password: str | None = None) -> SandboxUser:
        """Create a mailbox; the password is random unless given."""
        pm = self._pm
        account = SandboxUser(address.lower(), password or secrets.token_urlsafe(12))
        hashed = await pm.Passwords(self._imap_config).hash_password(account.password)
        meta = pm.UserMetadata(self._imap_config, account.address, password=hashed)
        self._login.users_dict[account.address] = meta
        self._users[account.address] = account
        self._inboxes.setdefault(account.address, _Inbox())
        return account

    def is_local(self, address: str) -> bool:
        return address.lower() in self._users

    async def deliver(self, rcpt: str, raw: bytes) -> None:
        """Put ``raw`` into ``rcpt``'s INBOX (IDLE clients are told at once)."""
        rcpt = rcpt.lower()
        pm = self._pm
        async with _identity(self._login, rcpt).new_session() as session:
            inbox = await session.mailbox_set.get_mailbox("INBOX")
            await inbox.append(pm.AppendMessage(raw, datetime.now(UTC), frozenset()), recent=True)
        box = self._inboxes[rcpt]
        async with box.arrived:
            box.messages.append(raw)
            box.arrived.notify_all()

    async def wait_for_mail(self, address: str, *, count: int = 1, within: float = 30) -> bytes:
        """Wait until ``address`` has at least ``count`` messages; return the newest."""
        box = self._inboxes[address.lower()]

        async def _wait() -> bytes:
            async with box.arrived:
                await box.arrived.wait_for(lambda: len(box.messages) >= count)
                return box.messages[-1]

        return await asyncio.wait_for(_wait(), within)

    def compose(
        self,
        *,
        subject: str,
        body: str,
        sender: str | None = None,
        to: str | None = None,
        in_reply_to: str | None = None,
        references: list[str] | None = None,
    ) -> bytes:
        """A plain-text mail as a person's mail client would write it."""
        msg = EmailMessage()
        msg["From"] = f"Alice <{sender or self.user.address}>" if sender is None else sender
        msg["To"] = to or self.bot.address
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(time.time(), localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=DOMAIN)
        if in_reply_to:
            msg["In-Reply-To"] = in_reply_to
            msg["References"] = " ".join(references or [in_reply_to])
        msg.set_content(body)
        return msg.as_bytes()

    async def send_as_user(
        self,
        subject: str,
        body: str,
        *,
        in_reply_to: str | None = None,
        references: list[str] | None = None,
    ) -> bytes:
        """The sandbox user writes to the bot over SMTP, like a mail client; returns the mail."""
        import aiosmtplib

        raw = self.compose(
            subject=subject, body=body, in_reply_to=in_reply_to, references=references
        )
        await aiosmtplib.send(
            raw,
            sender=self.user.address,
            recipients=[self.bot.address],
            hostname=self.host,
            port=self.smtp_port,
            username=self.user.address,
            password=self.user.password,
            start_tls=False,
            timeout=10,
            local_hostname="localhost",
        )
        return raw

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
        """aiosmtpd authenticator: a sandbox user with its password."""
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        account = self._users.get(auth_data.login.decode(errors="replace").lower())
        password = auth_data.password.decode(errors="replace")
        ok = account is not None and secrets.compare_digest(account.password, password)
        login = account.address if account is not None and ok else None
        return AuthResult(success=ok, handled=False, auth_data=login)

    def stamp(self, raw: bytes, login: str | None) -> bytes:
        """Prepend the Authentication-Results a provider would write.

        The sandbox cannot run SPF/DKIM, but it knows who logged in: mail whose
        From is the logged-in sandbox user passes DMARC; mail claiming a sandbox
        address without that login fails it (a forgery); other mail gets none.
        """
        author = sender_of(Headers.from_block(split_header_block(raw)[0]))[1]
        domain = author.rpartition("@")[2] or "invalid"
        if login is not None and author == login:
            verdict = f"auth=pass smtp.auth={login}; dmarc=pass header.from={domain}"
        elif self.is_local(author):
            verdict = f"dmarc=fail header.from={domain}"
        else:
            verdict = f"dmarc=none header.from={domain}"
        return f"Authentication-Results: {AUTHSERV_ID}; {verdict}\r\n".encode() + raw

    # ------------------------------------------------------------------ configs

    def channel_table(self, state_dir: Path, **overrides: Any) -> dict[str, Any]:
        """The ``[channels_config.email]`` values for the bot account on this sandbox."""
        table: dict[str, Any] = {
            "imap_host": self.host,
            "imap_port": self.imap_port,
            "imap_security": "plain",
            "smtp_host": self.host,
            "smtp_port": self.smtp_port,
            "smtp_tls": False,
            "smtp_security": "plain",
            "username": self.bot.address,
            "password": self.bot.password,
            "from_address": self.bot.address,
            "from_name": "Echo Bot",
            "allowed_senders": [self.user.address],
            # The sandbox's SMTP server is the bot's "provider": it stamps
            # Authentication-Results (see stamp()), so the demo runs under the
            # default sender_auth = "enforce" with that id trusted.
            "trusted_authserv_ids": [AUTHSERV_ID],
            "initial_sync": "unseen",
            "state_dir": str(state_dir),
            "poll_interval_secs": 5,
            # pymap's in-memory IDLE can miss a wake-up when mail lands right as a
            # session re-enters IDLE; each keepalive cycle also searches for new mail,
            # so a short one bounds that miss to seconds instead of minutes.
            "keepalive_secs": 3,
            "connect_timeout_secs": 5,
            "command_timeout_secs": 15,
        }
        table.update(overrides)
        return table

    def channel_config(self, state_dir: Path, **overrides: Any) -> EmailConfig:
        return config_from_table(self.channel_table(state_dir, **overrides))

    def config_toml(self, state_dir: Path) -> str:
        """The same settings as a config.toml, for running examples against the sandbox."""
        lines = ["[channels_config.email]"]
        for key, value in self.channel_table(state_dir).items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def describe(self) -> Iterator[str]:
        """How to reach the sandbox from other programs (for ``demo --keep-running``)."""
        yield f"IMAP  {self.host}:{self.imap_port} (plaintext, LOGIN)"
        yield f"SMTP  {self.host}:{self.smtp_port} (plaintext, AUTH optional)"
        yield f"bot   {self.bot.address}  password {self.bot.password}"
        yield f"user  {self.user.address}  password {self.user.password}"


def _identity(login: Any, name: str) -> Any:
    from pymap.backend.dict import Identity

    return Identity(name, login, None, frozenset())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class _Delivery:
    """aiosmtpd handler: local recipients only, delivered straight into pymap."""

    def __init__(self, sandbox: MailSandbox) -> None:
        self.sandbox = sandbox

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not self.sandbox.is_local(address):
            return f"550 5.1.1 <{address}>: the sandbox only delivers to its own users"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        login = session.auth_data if isinstance(session.auth_data, str) else None
        raw = self.sandbox.stamp(raw, login)
        for rcpt in envelope.rcpt_tos:
            await self.sandbox.deliver(rcpt, raw)
        return "250 2.0.0 delivered"
