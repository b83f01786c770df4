"""The doctor: checks everything a mail setup can get wrong, and says how to fix it.

Each check is bounded (``check_timeout``, 10 s by default) and the IMAP and SMTP
chains run side by side, so a whole run stays well under a minute even against
a host that swallows packets. A chain stops at its first failure (the later
checks are reported as ``skip``). Nothing is sent unless ``send_test`` is given.

DNS, TCP and the TLS handshake are probed on connections of the doctor's own,
so that a failure names the exact step (and the certificate's details can be
shown). From the greeting on, the IMAP checks use the channel's ImapSession and
the SMTP checks use aiosmtplib, so they log in the way the channel will.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import os
import re
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib

from prx_channel_email._mail.authresults import authserv_ids, provider_field, trust_line, verdict
from prx_channel_email._mail.envelope import sender_of
from prx_channel_email._mail.headers import Headers, split_header_block
from prx_channel_email._net.imap import ImapSession, ImapSettings, SelectInfo, open_session
from prx_channel_email._net.smtp import SmtpFailure, SmtpSettings, SmtpTransport
from prx_channel_email._net.tls import TlsSettings, ssl_context
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._outbound.compose import parse_recipient
from prx_channel_email._storage import low_space, make_private_dir
from prx_channel_email.config import EmailConfig, load_accounts, load_config, resolve_path
from prx_channel_email.config.providers import detect_provider, provider_named
from prx_channel_email.doctor.database import database_checks
from prx_channel_email.doctor.imap_checks import closest_folder, folders_check, push_check
from prx_channel_email.doctor.oauth import oauth_checks

# Re-exported: callers build and read reports from here, as before.
from prx_channel_email.doctor.report import Check as Check
from prx_channel_email.doctor.report import DoctorReport as DoctorReport
from prx_channel_email.doctor.report import Status as Status
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    ConfigError,
    FolderNotFoundError,
    TransportError,
)

Progress = Callable[[str], None]

DEFAULT_CHECK_TIMEOUT = 10.0
EXPIRY_WARN_DAYS = 14
HEADER_SAMPLE = 5

# The checks of each chain, in the order they run and are reported.
IMAP_CHECKS = (
    "imap dns",
    "imap tcp",
    "imap tls",
    "imap greeting",
    "imap login",
    "imap idle",
    "imap folder",
    "imap folders",
    "sender verification",
)
SMTP_CHECKS = ("smtp dns", "smtp tcp", "smtp tls", "smtp ehlo", "smtp auth", "send test")


# --------------------------------------------------------------------------- login fixes


def _login_fix(config: EmailConfig, host: str, port: int, key: str) -> str:
    if config.auth_method == "oauth2":
        return provider_named(config.oauth_provider).oauth_login_hint
    provider = detect_provider(host, port)
    base = f"check username and {key} (or the PRX_EMAIL_{key.upper()} variable)."
    if provider is not None and provider.login_hint:
        return f"{base} {provider.login_hint}"
    return f"{base} Providers with 2FA usually need an app password instead of your normal one."


def _port_fix(kind: str, security: str, port: int) -> str:
    if kind == "imap":
        return (
            f"imap_port {port} with imap_security = {security!r} does not match: use 993 with "
            "'tls' (implicit TLS) or 143 with 'starttls'."
        )
    return (
        f"smtp_port {port} with {security} does not match: use 465 with implicit TLS "
        "(smtp_security = 'tls') or 587 with 'starttls'."
    )


# --------------------------------------------------------------------------- small helpers


class _Fail(Exception):
    """Ends a chain with a failed check (``detail`` and ``fix``)."""

    def __init__(self, detail: str, fix: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


async def _bounded(awaitable: Awaitable[Any], budget: float, what: str, fix: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, budget)
    except TimeoutError:
        raise _Fail(f"no answer within {budget:g} s while {what}", fix) from None


def _cert_summary(cert: dict[str, Any] | None, now: float) -> tuple[str, int | None]:
    if not cert:
        return "certificate verified", None
    subject = dict(x[0] for x in cert.get("subject", ()) if x)
    issuer = dict(x[0] for x in cert.get("issuer", ()) if x)
    days: int | None = None
    not_after = cert.get("notAfter")
    if isinstance(not_after, str):
        days = int((ssl.cert_time_to_seconds(not_after) - now) // 86400)
    text = (
        f"certificate for {subject.get('commonName', '?')} "
        f"issued by {issuer.get('organizationName') or issuer.get('commonName', '?')}"
    )
    if days is not None:
        text += f", expires in {days} days"
    return text, days


def _tls_failure(exc: ssl.SSLError, kind: str, host: str, port: int, security: str) -> _Fail:
    """Turn a handshake error into a detail and the fix a person needs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason = exc.verify_message or exc.reason or str(exc)
        if code == 62 or "hostname" in str(reason).lower():
            return _Fail(
                f"certificate does not match the host name {host}: {reason}",
                f"set {kind}_host to a name the certificate is issued for "
                "(e.g. the provider's documented host, not an IP address or alias).",
            )
        if code == 10:
            return _Fail(
                f"the server's certificate has expired ({reason})",
                "the server's administrator must renew the certificate.",
            )
        return _Fail(
            f"certificate not trusted: {reason}",
            "the server uses a certificate from a CA this machine does not trust "
            "(self-signed or private CA): set ca_file to that CA's PEM file. "
            "Verification is never switched off.",
        )
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "record layer" in text or "HTTP_REQUEST" in text:
        return _Fail(
            f"port {port} does not speak TLS right away (it answered in plaintext)",
            _port_fix(kind, security, port),
        )
    return _Fail(f"TLS handshake failed: {exc.reason or text}", _port_fix(kind, security, port))


def _os_failure(exc: OSError, kind: str, host: str, port: int, security: str) -> _Fail:
    if isinstance(exc, ConnectionRefusedError):
        return _Fail(
            f"connection to {host}:{port} refused (nothing listens there)",
            _port_fix(kind, security, port),
        )
    return _Fail(
        f"cannot connect to {host}:{port}: {exc.strerror or exc}",
        f"check {kind}_host and {kind}_port, and that a firewall does not block port {port}.",
    )


# --------------------------------------------------------------------------- DNS + TCP + TLS


async def _resolve(host: str, port: int, kind: str, budget: float) -> str:
    name = host.strip("[]").rstrip(".").lower()
    if name == "invalid" or name.endswith(".invalid"):
        # RFC 6761: .invalid never resolves; no need to ask anyone.
        raise _Fail(f"{host} cannot resolve (.invalid is reserved)", f"check {kind}_host.")
    loop = asyncio.get_running_loop()
    try:
        infos = await _bounded(
            loop.getaddrinfo(host, port, type=0, proto=6),
            budget,
            f"resolving {host}",
            "check the DNS settings of this machine.",
        )
    except OSError as exc:
        provider = detect_provider(host)
        hint = (
            f" ({provider.label} uses {provider.imap.host} / {provider.smtp.host})"
            if provider and provider.imap and provider.smtp
            else ""
        )
        raise _Fail(
            f"{host} does not resolve: {exc.strerror or exc}",
            f"check the spelling of {kind}_host{hint}, and this machine's DNS.",
        ) from None
    addresses = sorted({info[4][0] for info in infos})
    return ", ".join(addresses[:3]) + (" ..." if len(addresses) > 3 else "")


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _tcp(host: str, port: int, kind: str, security: str, budget: float) -> _Conn:
    try:
        reader, writer = await _bounded(
            asyncio.open_connection(host, port, limit=1 << 20),
            budget,
            f"connecting to {host}:{port}",
            f"a firewall may drop traffic to port {port}; check {kind}_host and {kind}_port.",
        )
    except OSError as exc:
        raise _os_failure(exc, kind, host, port, security) from None
    return _Conn(reader, writer)


async def _start_tls(
    conn: _Conn, ctx: ssl.SSLContext, kind: str, host: str, port: int, security: str, budget: float
) -> str:
    """Upgrade ``conn`` to TLS; return a one-line certificate summary (warns near expiry)."""
    try:
        await _bounded(
            conn.writer.start_tls(ctx, server_hostname=host.strip("[]")),
            budget,
            "in the TLS handshake",
            _port_fix(kind, security, port),
        )
    except ssl.SSLError as exc:
        raise _tls_failure(exc, kind, host, port, security) from None
    except (ConnectionError, OSError) as exc:
        raise _Fail(
            f"connection closed during the TLS handshake: {exc}", _port_fix(kind, security, port)
        ) from None
    ssl_obj = conn.writer.get_extra_info("ssl_object")
    cert = ssl_obj.getpeercert() if ssl_obj is not None else None
    summary, days = _cert_summary(cert, time.time())
    version = ssl_obj.version() if ssl_obj is not None else "TLS"
    if days is not None and days < EXPIRY_WARN_DAYS:
        raise _Warn(f"{version}, {summary}", "the certificate expires soon; tell the server admin.")
    return f"{version}, {summary}"


class _Warn(Exception):
    """A check that passed with a caveat; the chain goes on."""

    def __init__(self, detail: str, fix: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


# --------------------------------------------------------------------------- IMAP


_CAPS_RE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


class _ImapProbe:
    """Just enough IMAP to see the greeting and run STARTTLS on a connection we own.

    Everything after the handshake goes through the channel's own ImapSession, so
    the doctor logs in, lists and selects exactly the way the channel will.
    """

    def __init__(self, conn: _Conn, budget: float) -> None:
        self.conn = conn
        self.budget = budget
        self.capabilities: set[str] = set()
        self._tag = 0

    async def _line(self) -> bytes:
        line = await self.conn.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        self._note_caps(line)
        return line.rstrip(b"\r\n")

    def _note_caps(self, line: bytes) -> None:
        m = _CAPS_RE.search(line)
        if m is None and line.upper().startswith(b"* CAPABILITY "):
            caps = line[len(b"* CAPABILITY ") :]
        elif m is not None:
            caps = m.group(1)
        else:
            return
        self.capabilities = {c.upper() for c in caps.decode("ascii", "replace").split()}

    async def greeting(self) -> bytes:
        return await asyncio.wait_for(self._line(), self.budget)

    async def command(self, text: str) -> tuple[bool, str]:
        """One command without literals (CAPABILITY, STARTTLS); (ok, tagged text)."""
        self._tag += 1
        tag = f"d{self._tag} ".encode()
        self.conn.writer.write(tag + text.encode() + b"\r\n")
        await self.conn.writer.drain()

        async def tagged() -> tuple[bool, str]:
            while not (line := await self._line()).startswith(tag):
                pass
            status, _, tail = line[len(tag) :].partition(b" ")
            return status.upper() == b"OK", tail.decode("utf-8", "replace")

        return await asyncio.wait_for(tagged(), self.budget)


async def _imap_handshake(
    config: EmailConfig, budget: float, record: Callable[[Status, str, str | None], None]
) -> None:
    """DNS, TCP and TLS on a connection of our own, so each step is named on failure."""
    host, port, security = config.imap_host, config.imap_port, config.imap_security
    record("pass", f"{host} -> {await _resolve(host, port, 'imap', budget)}", None)
    conn = await _tcp(host, port, "imap", security, budget)
    try:
        record("pass", f"connected to {host}:{port}", None)
        ctx = ssl_context(TlsSettings.from_config(config))
        probe = _ImapProbe(conn, budget)
        if security == "tls":
            record(*await _tls_step(conn, ctx, "imap", host, port, security, budget))
        await _imap_greeting(probe, port, security)
        if security == "starttls":
            if "STARTTLS" not in probe.capabilities:
                await probe.command("CAPABILITY")
            if "STARTTLS" not in probe.capabilities:
                raise _Fail(
                    f"{host}:{port} does not offer STARTTLS", _port_fix("imap", security, port)
                )
            ok, tail = await probe.command("STARTTLS")
            if not ok:
                raise _Fail(f"STARTTLS refused: {tail}", _port_fix("imap", security, port))
            record(*await _tls_step(conn, ctx, "imap", host, port, security, budget))
        elif security == "plain":
            record("skip", "plaintext connection (imap_security = 'plain', loopback only)", None)
        # Say goodbye: servers log a dropped connection as an error on every doctor run.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(probe.command("LOGOUT"), min(budget, 2.0))
    finally:
        conn.close()


async def _imap_chain(
    config: EmailConfig,
    tokens: TokenManager | None,
    budget: float,
    add: Callable[[str, Status, str, str | None], None],
    push_test: bool = False,
) -> None:
    port, security = config.imap_port, config.imap_security
    port_fix = _port_fix("imap", security, port)
    names = IMAP_CHECKS
    done: list[str] = []

    def record(status: Status, detail: str, fix: str | None = None) -> None:
        add(names[len(done)], status, detail, fix)
        done.append(names[len(done)])

    # The channel's session, with the doctor's budget for every wait.
    bounded = dataclasses.replace(
        ImapSettings.from_config(config), connect_timeout_secs=budget, command_timeout_secs=budget
    )
    session: ImapSession | None = None
    try:
        await _imap_handshake(config, budget, record)
        try:
            session = await ImapSession.connect(bounded, tokens=tokens)
        except TransportError as exc:
            raise _Fail(f"{exc.message} [{exc.code}]", port_fix) from None
        caps = " ".join(sorted(session.capabilities))
        if not {"IMAP4REV1", "IMAP4REV2"} & session.capabilities:
            raise _Fail(f"not an IMAP4rev1 server: {caps}", port_fix)
        greeting = _CAPS_RE.sub(b"", session.greeting.encode()).decode().strip()
        greeting = re.sub(r"^\*\s+OK\s*", "", greeting)[:60] or "(empty)"
        record("pass", f"greeting {greeting!r}; capabilities: {caps}")
        try:
            await session.login()
        except AuthenticationError as exc:
            raise _Fail(
                exc.message, _login_fix(config, config.imap_host, port, "password")
            ) from None
        except TransportError as exc:
            raise _Fail(exc.message, "the server is busy or down; try again later.") from None
        record("pass", f"logged in as {config.username}")
        # The folder by the server's rules ("Work" is "INBOX.Work" on Courier).
        wire = await session.resolve_folder(config.imap_folder)
        info: SelectInfo | None = None
        missing: FolderNotFoundError | None = None
        try:
            info = await session.select(wire)
        except FolderNotFoundError as exc:
            missing = exc
        if not session.has_idle:
            record(
                "warn",
                "the server does not support IDLE",
                f"nothing to do: the channel polls every {config.poll_interval_secs} s instead "
                "(lower poll_interval_secs for faster answers).",
            )
        elif push_test and info is not None:
            # The second connection logs in as the channel does (open_session).
            second = functools.partial(open_session, bounded, tokens)
            record(*await push_check(config, session, wire, second, budget))
        else:
            record(
                "pass",
                "IDLE advertised (prx-email doctor --push-test measures whether new mail "
                "is really pushed at once)",
            )
        if missing is not None or info is None:
            folders = missing.folders if missing is not None else []
            ns = await session.namespace()
            close = closest_folder(config.imap_folder, folders, ns.delimiter)
            shown = ", ".join(folders) if folders else "(none)"
            raise _Fail(
                f"folder {config.imap_folder!r} does not exist",
                (f'set imap_folder = "{close}". ' if close else "")
                + f"Folders on the server: {shown}",
            )
        named = f" (on this server: {wire!r})" if wire != config.imap_folder else ""
        record("pass", f"{config.imap_folder!r} exists{named}, {info.exists} messages")
        record(*await folders_check(config, session))
        record(*await _auth_results_check(config, session, info.exists))
    except _Fail as failure:
        record("fail", failure.detail, failure.fix)
    except ChannelError as exc:
        record("fail", f"{exc.message} [{exc.code}]", port_fix)
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        record(
            "fail",
            f"connection lost: {exc or type(exc).__name__}",
            port_fix,
        )
    except TimeoutError:
        record("fail", f"no answer within {budget:g} s", port_fix)
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.logout(), 2)
        for name in names[len(done) :]:
            add(name, "skip", "skipped: an earlier IMAP check failed", None)


async def _tls_step(
    conn: _Conn,
    ctx: ssl.SSLContext,
    kind: str,
    host: str,
    port: int,
    security: str,
    budget: float,
) -> tuple[Status, str, str | None]:
    try:
        return "pass", await _start_tls(conn, ctx, kind, host, port, security, budget), None
    except _Warn as warn:
        return "warn", warn.detail, warn.fix


async def _imap_greeting(probe: _ImapProbe, port: int, security: str) -> bytes:
    try:
        greeting = await probe.greeting()
    except TimeoutError:
        fix = _port_fix("imap", security, port)
        if security != "tls":
            fix = (
                f"port {port} sent no greeting: it probably expects TLS right away "
                "(imap_security = 'tls'). " + fix
            )
        raise _Fail(f"no IMAP greeting within {probe.budget:g} s", fix) from None
    except ssl.SSLError as exc:
        raise _tls_failure(exc, "imap", "", port, security) from None
    if greeting.upper().startswith(b"* BYE"):
        raise _Fail(f"the server said goodbye at once: {greeting[:80]!r}", None)
    if not greeting.upper().startswith((b"* OK", b"* PREAUTH")):
        raise _Fail(f"not an IMAP greeting: {greeting[:80]!r}", _port_fix("imap", security, port))
    return greeting


@dataclass(frozen=True)
class AuthReading:
    """What one message's headers say about its sender, read as the policy reads them."""

    sender: str
    entry: (
        str | None
    )  # the trusted_authserv_ids entry its provider field needs (None: none/unreadable)
    has_field: bool  # any Authentication-Results at all
    trusted: bool  # the provider field is believed under the configured ids
    verified: bool | None  # the policy's sender_verified under the configured ids
    ignored_ids: list[str]  # authserv-ids of lower fields, never read


def read_auth(header_block: bytes, trusted: list[str]) -> AuthReading:
    """One message's authenticity, by the policy's own header reader and verdict."""
    headers = Headers.from_block(split_header_block(header_block)[0])
    fields = headers.get_all("authentication-results")
    top = provider_field(fields)
    sender = sender_of(headers)[1]
    return AuthReading(
        sender=sender,
        entry=top.entry if top is not None else None,
        has_field=top is not None,
        trusted=top is not None and top.trusted_by(trusted),
        verified=verdict(fields, sender, trusted).verified,
        ignored_ids=authserv_ids(fields[1:]),
    )


def judge_auth(
    config: EmailConfig, newest_first: list[AuthReading]
) -> tuple[Status, str, str | None]:
    """The "sender verification" check from the newest messages' readings.

    Under ``sender_auth = "enforce"`` a setup that would refuse every allowed
    sender fails; under "flag" the same is a warning. The line to paste is built
    from the provider field of the newest message that carries one.
    """
    trusted = config.trusted_authserv_ids
    mode = config.sender_auth
    bad: Status = "fail" if mode == "enforce" else "warn"
    opt_down = (
        "or set sender_auth = 'flag' to deliver unverified mail (the host sees sender_verified)"
    )
    if mode == "off":
        return (
            "warn",
            "sender_auth = 'off': a forged From reaches the agent",
            ("set sender_auth = 'enforce' (the default) once trusted_authserv_ids is right."),
        )
    if not newest_first:
        detail = "no mail in the folder to inspect"
        if trusted:
            return "skip", f"{detail}; trusting {', '.join(trusted)}", None
        consequence = (
            "every allowed sender's mail is refused"
            if mode == "enforce"
            else "senders are not verified"
        )
        return (
            bad,
            f"{detail}; trusted_authserv_ids is empty, so {consequence}",
            "send a mail to the account from outside, run the doctor again and paste the "
            f"line it prints; {opt_down}.",
        )
    sampled = len(newest_first)
    carrying = [r for r in newest_first if r.has_field]
    if not carrying:
        consequence = (
            "so every allowed sender's mail is refused as unverified"
            if mode == "enforce"
            else "so sender_verified stays None"
        )
        return (
            bad,
            f"none of the newest {sampled} messages carries Authentication-Results, {consequence}",
            "the server records no SPF/DKIM/DMARC results: set sender_auth = 'flag' and rely "
            "on allowed_senders only for addresses you trust not to be forged.",
        )
    newest = carrying[0]
    entries = sorted({r.entry for r in carrying if r.entry})
    lower = sorted({i for r in carrying for i in r.ignored_ids})
    seen = f"topmost field from {', '.join(entries) or 'an unreadable field'}"
    if lower:
        seen += f"; lower fields naming {', '.join(lower)} are ignored (a sender can plant them)"
    if newest.trusted:
        hits = sum(r.trusted for r in carrying)
        verified = sum(r.verified is True for r in carrying)
        return (
            "pass",
            f"{hits} of the newest {sampled} messages carry Authentication-Results from a "
            f"trusted authserv-id, {verified} verified ({seen})",
            None,
        )
    if newest.entry is None:
        return (
            bad,
            f"the newest message's topmost Authentication-Results cannot be read "
            f"unambiguously ({seen})",
            f"look at its raw source; {opt_down}.",
        )
    line = trust_line([newest.entry])
    if not trusted:
        what = f"messages carry Authentication-Results ({seen}), but trusted_authserv_ids is empty"
    else:
        what = f"the newest message's Authentication-Results is not from a trusted id ({seen})"
    return (
        bad,
        what,
        f"if {newest.entry} is your provider's receiving server (check the topmost "
        f"Authentication-Results in the raw source of a mail from outside), paste: {line}",
    )


async def _auth_results_check(
    config: EmailConfig, session: ImapSession, exists: int
) -> tuple[Status, str, str | None]:
    readings: list[AuthReading] = []
    if exists:
        first = max(1, exists - HEADER_SAMPLE + 1)
        uids = await session.uid_search(f"{first}:{exists}")
        headers = await session.fetch_headers(uids)
        trusted = config.trusted_authserv_ids
        readings = [read_auth(headers[uid], trusted) for uid in sorted(headers, reverse=True)]
    return judge_auth(config, readings)


# --------------------------------------------------------------------------- SMTP


async def _smtp_chain(
    config: EmailConfig,
    tokens: TokenManager | None,
    budget: float,
    add: Callable[[str, Status, str, str | None], None],
    send_test: str | None,
) -> None:
    host, port = config.smtp_host, config.smtp_port
    security = config.smtp_effective_security
    names = SMTP_CHECKS if send_test else SMTP_CHECKS[:-1]
    done: list[str] = []

    def record(status: Status, detail: str, fix: str | None = None) -> None:
        add(names[len(done)], status, detail, fix)
        done.append(names[len(done)])

    ctx = ssl_context(TlsSettings.from_config(config))
    client: aiosmtplib.SMTP | None = None
    try:
        record("pass", f"{host} -> {await _resolve(host, port, 'smtp', budget)}")
        conn = await _tcp(host, port, "smtp", security, budget)
        try:
            record("pass", f"connected to {host}:{port}")
            record(*await _smtp_tls_probe(conn, ctx, host, port, security, budget))
            await _smtp_goodbye(conn, budget, greeted=security == "starttls")
        finally:
            conn.close()
        # The channel's own client and AUTH exchange, with the doctor's budget.
        transport = SmtpTransport(
            dataclasses.replace(
                SmtpSettings.from_config(config),
                connect_timeout_secs=budget,
                command_timeout_secs=budget,
            ),
            tokens=tokens,
        )
        client = transport.client()
        try:
            await asyncio.wait_for(client.connect(), budget * 2)
            if not client.esmtp_extensions:  # connect() only says EHLO around STARTTLS
                await asyncio.wait_for(client.ehlo(), budget)
        except aiosmtplib.SMTPException as exc:
            raise _Fail(f"EHLO failed: {exc}", _port_fix("smtp", security, port)) from None
        auth = sorted(client.server_auth_methods)
        extras = " (STARTTLS done)" if security == "starttls" else ""
        record(
            "pass",
            f"EHLO accepted{extras}; AUTH offered: {' '.join(auth).upper() or 'none'}",
        )
        user = config.smtp_login[0]
        if not client.supports_extension("auth"):
            raise _Fail(
                f"{host}:{port} offers no AUTH on this connection",
                "use the provider's submission port with TLS (465 or 587 with STARTTLS); "
                "port 25 usually refuses to authenticate.",
            )
        key = "smtp_password" if config.smtp_password is not None else "password"
        try:
            await asyncio.wait_for(transport.login(client), budget)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _Fail(
                f"AUTH as {user} refused: {exc.code} {exc.message[:100]}",
                _login_fix(config, host, port, key),
            ) from None
        except (aiosmtplib.SMTPException, SmtpFailure, AuthenticationError) as exc:
            raise _Fail(f"AUTH failed: {exc}", _login_fix(config, host, port, key)) from None
        record("pass", f"authenticated as {user}")
        if send_test:
            record(*await _send_test(config, client, send_test))
    except _Fail as failure:
        record("fail", failure.detail, failure.fix)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        record(
            "fail",
            f"SMTP conversation failed: {exc or type(exc).__name__}",
            _port_fix("smtp", security, port),
        )
    except ChannelError as exc:
        record("fail", f"{exc.message} [{exc.code}]", _port_fix("smtp", security, port))
    finally:
        if client is not None and client.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 2)
        for name in names[len(done) :]:
            add(name, "skip", "skipped: an earlier SMTP check failed", None)


async def _smtp_tls_probe(
    conn: _Conn, ctx: ssl.SSLContext, host: str, port: int, security: str, budget: float
) -> tuple[Status, str, str | None]:
    if security == "tls":
        return await _tls_step(conn, ctx, "smtp", host, port, security, budget)
    if security == "plain":
        return "skip", "plaintext SMTP (loopback only)", None
    fix = _port_fix("smtp", security, port)
    try:
        greeting = await asyncio.wait_for(conn.reader.readline(), budget)
    except TimeoutError:
        raise _Fail(
            f"no SMTP greeting within {budget:g} s: port {port} probably expects TLS at once",
            fix,
        ) from None
    if not greeting.startswith(b"220"):
        raise _Fail(f"not an SMTP greeting: {greeting[:80]!r}", fix)
    conn.writer.write(b"EHLO doctor.localhost\r\n")
    await conn.writer.drain()
    lines = await _smtp_reply(conn, budget)
    if not any(b"STARTTLS" in line.upper() for line in lines):
        raise _Fail(f"{host}:{port} does not offer STARTTLS", fix)
    conn.writer.write(b"STARTTLS\r\n")
    await conn.writer.drain()
    reply = await _smtp_reply(conn, budget)
    if not reply or not reply[-1].startswith(b"220"):
        raise _Fail(f"STARTTLS refused: {reply[-1][:80]!r}" if reply else "STARTTLS refused", fix)
    return await _tls_step(conn, ctx, "smtp", host, port, security, budget)


async def _smtp_goodbye(conn: _Conn, budget: float, *, greeted: bool) -> None:
    """QUIT the probe connection: a server logs a dropped one ("lost connection after
    STARTTLS") on every doctor run. Never fails the check."""

    async def goodbye() -> None:
        if not greeted:
            await _smtp_reply(conn, budget)  # the greeting (after the TLS handshake)
        conn.writer.write(b"QUIT\r\n")
        await conn.writer.drain()
        await _smtp_reply(conn, budget)

    with contextlib.suppress(Exception):
        await asyncio.wait_for(goodbye(), min(budget, 2.0))


async def _smtp_reply(conn: _Conn, budget: float) -> list[bytes]:
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(conn.reader.readline(), budget)
        if not line:
            raise ConnectionError("the server closed the connection")
        lines.append(line.rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            return lines


async def _send_test(
    config: EmailConfig, client: aiosmtplib.SMTP, address: str
) -> tuple[Status, str, str | None]:
    msg = EmailMessage()
    msg["From"] = email.utils.formataddr((config.from_name or "", config.from_address))
    msg["To"] = address
    msg["Subject"] = "prx-email doctor: test message"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=config.from_address.rsplit("@", 1)[-1])
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("This message was sent by `prx-email doctor --send-test` to check SMTP.\n")
    try:
        errors, _ = await client.send_message(msg)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return "fail", f"{address} refused: {exc}", "check the address."
    except aiosmtplib.SMTPSenderRefused as exc:
        return (
            "fail",
            f"sender {config.from_address} refused: {exc.code} {exc.message[:80]}",
            "the provider only lets this account send as its own address or verified aliases.",
        )
    except aiosmtplib.SMTPException as exc:
        return "fail", f"sending failed: {exc}", None
    if errors:
        return "fail", f"refused: {errors}", "check the address."
    return "pass", f"test message {msg['Message-ID']} accepted for {address}", None


# --------------------------------------------------------------------------- local checks


def _local_checks(config: EmailConfig) -> list[Check]:
    checks: list[Check] = []
    user_domain = config.username.rsplit("@", 1)[-1].lower() if "@" in config.username else None
    from_domain = config.from_address.rsplit("@", 1)[-1].lower()
    if config.from_address.lower() == config.username.lower():
        checks.append(Check("from address", "pass", f"{config.from_address} is the login address"))
    elif user_domain is not None and user_domain == from_domain:
        checks.append(
            Check(
                "from address",
                "pass",
                f"{config.from_address} is in the account's domain {user_domain}",
            )
        )
    elif user_domain is None and from_domain in config.smtp_host.lower():
        checks.append(Check("from address", "pass", f"{from_domain} matches the SMTP host"))
    else:
        checks.append(
            Check(
                "from address",
                "warn",
                f"from_address {config.from_address} is not the login {config.username}",
                "most providers only let an account send as itself or a verified alias; "
                "replies from another address may be rejected or marked as spam.",
            )
        )
    senders = config.allowed_senders
    if not senders:
        checks.append(
            Check(
                "allowed senders",
                "warn",
                "allowed_senders is empty: nobody will be answered",
                'add the people the bot may answer, e.g. allowed_senders = ["you@example.com"].',
            )
        )
    elif "*" in senders:
        checks.append(
            Check(
                "allowed senders",
                "warn",
                'allowed_senders contains "*": everybody will be answered, spammers included',
                "list addresses or '@yourdomain.com' instead, "
                "unless the bot is meant to be public.",
            )
        )
    else:
        shown = ", ".join(senders[:3]) + (
            f" and {len(senders) - 3} more" if len(senders) > 3 else ""
        )
        checks.append(Check("allowed senders", "pass", f"answers {shown}"))
    return checks


def _writable(path: Path) -> str | None:
    """None when ``path`` (created if needed, owner-only as the channel makes it)
    accepts a file; else why not."""
    try:
        make_private_dir(path)
        fd, name = tempfile.mkstemp(prefix=".doctor-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _space_check(path: Path) -> Check:
    """Free space where the state lives (the same rule the store logs at start)."""
    warning = low_space(path)
    if warning is None:
        return Check("state dir space", "pass", f"enough free space under {path}")
    return Check(
        "state dir space",
        "warn",
        warning,
        "free some space there, or set state_dir to a roomier filesystem: with no space"
        " left the channel pauses (health false, code storage_full) until there is.",
    )


async def _dir_checks(config: EmailConfig, budget: float) -> list[Check]:
    checks: list[Check] = []
    for name, key, path in (
        ("state dir", "state_dir", config.state_dir),
        ("attachments dir", "attachments_dir", config.attachments_path),
    ):
        try:
            problem = await asyncio.wait_for(asyncio.to_thread(_writable, path), budget)
        except TimeoutError:
            problem = f"no answer within {budget:g} s (a hung network file system?)"
        if problem is None:
            checks.append(Check(name, "pass", f"{path} is writable"))
            if key == "state_dir":
                checks.append(_space_check(path))
        else:
            checks.append(
                Check(
                    name,
                    "fail",
                    f"{path} is not writable: {problem}",
                    f"set {key} to a directory this user can write, or fix its permissions.",
                )
            )
    return checks


# --------------------------------------------------------------------------- entry points


async def run_doctor(
    config: EmailConfig,
    *,
    send_test: str | None = None,
    push_test: bool = False,
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    config_path: str | None = None,
    progress: Progress | None = None,
) -> DoctorReport:
    """Run every check against ``config``; the library form of ``prx-email doctor``."""
    report = DoctorReport(config_path=config_path)
    report.checks.append(
        Check("config", "pass", f"valid ({config_path})" if config_path else "valid")
    )
    report.checks.extend(_local_checks(config))
    report.checks.extend(await _dir_checks(config, check_timeout))
    # Shared state (state_url): the database, its schema and clock, who serves what.
    report.checks.extend(await database_checks(config, check_timeout))
    tokens: TokenManager | None = None
    if config.auth_method == "oauth2":  # first: the logins below need the token
        tokens, found = await oauth_checks(config, check_timeout)
        report.checks.extend(found)
    results: dict[str, Check] = {}
    bad_send_test: str | None = None
    if send_test is not None:
        try:
            send_test = parse_recipient(send_test)
        except ChannelError as exc:
            bad_send_test, send_test = exc.message, None

    def add(name: str, status: Status, detail: str, fix: str | None) -> None:
        results[name] = Check(name, status, detail, fix)
        if progress is not None:
            progress(f"{name}: {status}")

    if progress is not None:
        progress("connecting to the IMAP and SMTP servers")
    # Each step has its own budget; a whole chain gets four of them, so a server that
    # answers every step slowly still cannot keep the doctor busy for a minute.
    chain_budget = max(4 * check_timeout, 20.0) + (2 * check_timeout if push_test else 0)
    outcomes = await asyncio.gather(
        asyncio.wait_for(_imap_chain(config, tokens, check_timeout, add, push_test), chain_budget),
        asyncio.wait_for(_smtp_chain(config, tokens, check_timeout, add, send_test), chain_budget),
        return_exceptions=True,
    )
    for names, outcome in zip((IMAP_CHECKS, SMTP_CHECKS), outcomes, strict=True):
        if isinstance(outcome, BaseException):
            _mark_out_of_time(results, names, chain_budget, outcome)
    if bad_send_test is not None:
        results["send test"] = Check(
            "send test", "fail", bad_send_test, "give --send-test exactly one email address."
        )
    report.checks.extend(results[n] for n in (*IMAP_CHECKS, *SMTP_CHECKS) if n in results)
    return report


def _mark_out_of_time(
    results: dict[str, Check], names: tuple[str, ...], budget: float, exc: BaseException
) -> None:
    """The step that was running when a chain stopped is the one that failed.

    A chain ends early by running out of time, or (a bug) by an error no check
    expected: either way the report names the step, instead of a traceback.
    """
    if not isinstance(exc, TimeoutError):
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            raise exc
        for name in names:
            if name not in results or results[name].status == "skip":
                results[name] = Check(
                    name,
                    "fail",
                    f"unexpected {type(exc).__name__}: {exc}",
                    "run again with --debug for details, and please report it.",
                )
                return
        return
    for name in names:
        check = results.get(name)
        if check is not None and check.status == "skip":
            results[name] = Check(
                name,
                "fail",
                f"the {name.split()[0].upper()} checks took longer than {budget:g} s in all",
                "the server answers very slowly; check the network path and the host.",
            )
            return


def invalid_config_report(error: ConfigError) -> DoctorReport:
    """The report for a config that could not be loaded (exit code 2)."""
    detail = "; ".join(error.problems) if error.problems else error.message
    return DoctorReport(
        checks=[
            Check(
                "config",
                "fail",
                detail,
                "fix the fields named above (see config.toml.example for every field).",
            )
        ],
        config_path=error.path,
        config_invalid=True,
    )


async def doctor(
    path: str | os.PathLike[str] | None = None,
    *,
    send_test: str | None = None,
    push_test: bool = False,
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    progress: Progress | None = None,
) -> DoctorReport:
    """Load the config at ``path`` (or ``$PRX_CONFIG``/``./config.toml``) and run the doctor."""
    shown = str(resolve_path(path))
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as error:
        return invalid_config_report(error)
    return await run_doctor(
        config,
        send_test=send_test,
        push_test=push_test,
        check_timeout=check_timeout,
        config_path=shown,
        progress=progress,
    )


# Accounts checked at once by doctor_accounts: enough to check many in reasonable
# time, few enough that no server sees a burst of logins from the doctor.
ACCOUNTS_AT_ONCE = 4


async def doctor_accounts(
    path: str | os.PathLike[str] | None = None,
    *,
    account: str | None = None,
    send_test: str | None = None,
    push_test: bool = False,
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    progress: Progress | None = None,
) -> list[DoctorReport]:
    """The doctor for every account of the config at ``path`` (or only ``account``):
    one report each, in the config's order, ``report.account`` naming it.

    A config that cannot be loaded, or an ``account`` it does not have, gives one
    report with ``config_invalid`` (exit code 2)."""
    shown = str(resolve_path(path))
    try:
        accounts = await asyncio.to_thread(load_accounts, path)
    except ConfigError as error:
        return [invalid_config_report(error)]
    if account is not None:
        if account not in accounts:
            names = ", ".join(accounts)
            problem = f"--account {account}: no such account (the config has: {names})"
            return [invalid_config_report(ConfigError(problem, path=shown, problems=[problem]))]
        accounts = {account: accounts[account]}
    several = len(accounts) > 1
    gate = asyncio.Semaphore(ACCOUNTS_AT_ONCE)

    async def one(name: str, config: EmailConfig) -> DoctorReport:
        def told(text: str) -> None:
            if progress is not None:
                progress(f"{name}: {text}" if several else text)

        async with gate:
            report = await run_doctor(config, send_test=send_test, push_test=push_test,
                                      check_timeout=check_timeout, config_path=shown,
                                      progress=told)  # fmt: skip
        report.account = name
        return report

    return list(await asyncio.gather(*(one(n, c) for n, c in accounts.items())))
