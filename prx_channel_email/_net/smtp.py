"""SMTP transport: one verified, authenticated connection reused across a burst.

The transport knows nothing of the outbox; it sends bytes and says, for every
failure, whether trying again later can help (:attr:`SmtpFailure.permanent`).
That classification is the whole retry policy's input:

- permanent: a 5xx reply (rejected sender/recipient/content), failed
  authentication, a certificate that does not verify, plaintext refused;
- transient: connection refused or dropped, timeouts, 4xx replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib

from prx_channel_email._net.tls import TlsSettings, check_plaintext_allowed, ssl_context
from prx_channel_email._oauth.tokens import TokenManager, required, smtp_login
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.slices import ConfigSlice
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    InsecureConnectionError,
    OAuthUnavailable,
)

log = logging.getLogger("prx_channel_email.smtp")  # the name users filter on

#: A reused connection idle for longer than this is probed with NOOP before use.
PROBE_AFTER_IDLE_SECS = 30.0


class SmtpFailure(ChannelError):
    """A send that did not go through. ``permanent`` says whether a retry is pointless."""

    code = "smtp_failed"

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str,
        smtp_code: int | None = None,
        auth: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.permanent = permanent
        self.smtp_code = smtp_code
        self.auth = auth


def classify(exc: BaseException, *, host: str) -> SmtpFailure:
    """Map an aiosmtplib/OS exception to a transient or permanent :class:`SmtpFailure`."""
    if isinstance(exc, SmtpFailure):
        return exc
    if isinstance(exc, InsecureConnectionError):
        return SmtpFailure(str(exc), permanent=True, code=exc.code)
    if isinstance(exc, OAuthUnavailable):  # the token endpoint is down: later may work
        return SmtpFailure(str(exc), permanent=False, code=exc.code)
    if isinstance(exc, AuthenticationError):  # no usable OAuth grant (oauth.py)
        return SmtpFailure(str(exc), permanent=True, code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        transient = 400 <= exc.code < 500
        return SmtpFailure(
            f"SMTP server {host} refused the login ({exc.code} {exc.message}); "
            "check username/password (smtp_username/smtp_password)",
            permanent=not transient,
            code="smtp_auth_transient" if transient else "auth_failed",
            smtp_code=exc.code,
            auth=not transient,
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        worst = max(codes) if codes else 550
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        return _by_code(worst, f"recipient refused by {host}: {detail}", "recipient_refused")
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return _by_code(
            exc.code,
            f"recipient {exc.recipient} refused by {host}: {exc.code} {exc.message}",
            "recipient_refused",
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return _by_code(
            exc.code, f"sender refused by {host}: {exc.code} {exc.message}", "sender_refused"
        )
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError | aiosmtplib.SMTPHeloError):
        # A greeting/EHLO refusal is about this connection, not this message.
        return SmtpFailure(
            f"SMTP server {host} refused the session: {exc.code} {exc.message}",
            permanent=False,
            code="smtp_unavailable",
            smtp_code=exc.code,
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _by_code(exc.code, f"{host} answered {exc.code} {exc.message}", "smtp_rejected")
    cert_error = _cert_error(exc)
    if cert_error is not None:
        return SmtpFailure(
            f"the certificate of {host} does not verify ({cert_error.verify_message}); "
            "set ca_file if the server uses a private CA",
            permanent=True,
            code="tls_verify_failed",
        )
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return SmtpFailure(
            f"SMTP server {host} does not support what the configured security needs: {exc}",
            permanent=True,
            code="smtp_not_supported",
        )
    if isinstance(exc, TimeoutError):
        return SmtpFailure(f"timed out talking to {host}", permanent=False, code="smtp_timeout")
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return SmtpFailure(
            f"connection to {host} failed: {exc}", permanent=False, code="smtp_connection"
        )
    raise exc


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """aiosmtplib wraps TLS failures in a connect error; look through the chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _by_code(smtp_code: int, message: str, code: str) -> SmtpFailure:
    permanent = smtp_code >= 500
    return SmtpFailure(
        message,
        permanent=permanent,
        code=code if permanent else "smtp_transient",
        smtp_code=smtp_code,
    )


@dataclass(frozen=True)
class SmtpSettings(ConfigSlice):
    """What the SMTP transport reads of the config (the names are EmailConfig's)."""

    account: str
    smtp_host: str
    smtp_port: int
    smtp_effective_security: Literal["tls", "starttls", "plain"]
    auth_method: Literal["password", "oauth2"]
    smtp_login: tuple[str, str] = field(repr=False)  # (user, secret); "" with OAuth
    from_address: str
    connect_timeout_secs: float
    command_timeout_secs: float
    ca_file: Path | None
    allow_insecure: bool

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(ca_file=self.ca_file, allow_insecure=self.allow_insecure)


def ehlo_name(config: SmtpSettings) -> str:
    """The name we greet with: the sender's domain, known without asking DNS."""
    return config.from_address.rsplit("@", 1)[-1]


class SmtpTransport:
    """One SMTP connection, opened on demand, reused while it lives, reopened when dropped.

    Sends are serialised on the connection (SMTP has one transaction at a time).
    """

    def __init__(
        self,
        config: EmailConfig | SmtpSettings,
        metrics: Metrics | None = None,
        *,
        tokens: TokenManager | None = None,
    ) -> None:
        """``tokens``: the account's token manager, which an OAuth login needs."""
        if config.auth_method == "oauth2":  # a wiring error: say so now, not at each retry
            required(tokens, "SMTP login")
        self.config = SmtpSettings.of(config)
        self.tokens = tokens
        self.metrics = metrics or Metrics()
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()
        self._last_used = 0.0

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    def client(self, *, auto_starttls: bool = True) -> aiosmtplib.SMTP:
        """A configured, unconnected client (the doctor drives it step by step).

        With ``auto_starttls`` aiosmtplib does STARTTLS inside connect().
        """
        cfg = self.config
        security = cfg.smtp_effective_security
        if security == "plain":
            check_plaintext_allowed(cfg.tls, cfg.smtp_host)
        return aiosmtplib.SMTP(
            hostname=cfg.smtp_host,
            port=cfg.smtp_port,
            timeout=cfg.command_timeout_secs,
            use_tls=security == "tls",
            start_tls=security == "starttls" and auto_starttls,
            validate_certs=True,
            tls_context=ssl_context(cfg.tls) if security != "plain" else None,
            # Without a name aiosmtplib calls socket.getfqdn(): a blocking DNS lookup.
            local_hostname=ehlo_name(cfg),
        )

    async def _open(self) -> aiosmtplib.SMTP:
        cfg = self.config
        if cfg.auth_method == "oauth2":  # no usable grant: fail before connecting
            await required(self.tokens, "SMTP login").check_grant()
        smtp = self.client(auto_starttls=False)
        try:
            await smtp.connect(timeout=cfg.connect_timeout_secs)
            await smtp.ehlo()  # aiosmtplib defers EHLO; we need the capabilities now
            if cfg.smtp_effective_security == "starttls":
                if not smtp.supports_extension("starttls"):
                    # Never fall back to plaintext: that is what a downgrade attack wants.
                    raise SmtpFailure(
                        f"SMTP server {cfg.smtp_host}:{cfg.smtp_port} does not offer STARTTLS; "
                        "refusing to send the password in plaintext (use smtp_security = "
                        '"tls" for port 465)',
                        permanent=True,
                        code="starttls_unavailable",
                    )
                await smtp.starttls(timeout=cfg.connect_timeout_secs)
                await smtp.ehlo()
            if smtp.supports_extension("auth"):
                await self.login(smtp)
            else:
                log_event(
                    log,
                    logging.WARNING,
                    "smtp.auth_not_offered",
                    account=cfg.account,
                    host=cfg.smtp_host,
                    code="auth_not_offered",
                )
        except BaseException:
            smtp.close()
            raise
        self.metrics.inc("smtp.connects")
        log_event(
            log,
            logging.INFO,
            "smtp.connected",
            account=cfg.account,
            host=cfg.smtp_host,
            port=cfg.smtp_port,
            security=cfg.smtp_effective_security,
        )
        return smtp

    async def login(self, smtp: aiosmtplib.SMTP) -> None:
        """Exactly one AUTH exchange: trying every mechanism on a bad password
        would multiply failed logins (and trip the server's lockout sooner)."""
        user, secret = self.config.smtp_login
        offered = set(smtp.supported_auth_methods)
        if self.config.auth_method == "oauth2":
            tokens = required(self.tokens, "SMTP login")
            await smtp_login(tokens, smtp, user, self.config.smtp_host)
        elif "plain" in offered:
            await smtp.auth_plain(user, secret)
        elif "login" in offered:
            await smtp.auth_login(user, secret)
        elif "cram-md5" in offered:
            await smtp.auth_crammd5(user, secret)
        else:
            raise SmtpFailure(
                f"SMTP server {self.config.smtp_host} offers no password mechanism we support "
                f"(offered: {', '.join(sorted(offered)) or 'none'})",
                permanent=True,
                code="auth_unsupported",
                auth=True,
            )

    async def check_login(self) -> None:
        """Connect, log in and QUIT, once: the readiness check. Raises SmtpFailure.

        The same connection code as sending, so a pass means a send can log in.
        """
        try:
            smtp = await self._open()
        except SmtpFailure:
            raise
        except Exception as exc:
            raise classify(exc, host=self.config.smtp_host) from exc
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await asyncio.wait_for(smtp.quit(), timeout=self.config.connect_timeout_secs)
        smtp.close()

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The live connection (probed if it sat idle) and whether it is a reused one."""
        smtp = self._smtp
        if smtp is not None and smtp.is_connected:
            if time.monotonic() - self._last_used < PROBE_AFTER_IDLE_SECS:
                return smtp, True
            try:
                await smtp.noop()
                return smtp, True
            except (aiosmtplib.SMTPException, OSError):
                self._drop()
        self._smtp = await self._open()
        return self._smtp, False

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def send(self, mail_from: str, recipient: str, raw: bytes) -> None:
        """Send one message; returns once the server accepted it. Raises SmtpFailure."""
        host = self.config.smtp_host
        async with self._lock:
            for attempt in (1, 2):
                reused = False
                try:
                    smtp, reused = await self._connection()
                    errors, _reply = await smtp.sendmail(mail_from, [recipient], raw)
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                    self._drop()
                    if reused and attempt == 1:
                        # The server closed a connection we kept open: reopen once, at once.
                        self.metrics.inc("smtp.reconnects")
                        log_event(
                            log,
                            logging.INFO,
                            "smtp.reconnect",
                            account=self.config.account,
                            host=host,
                            code="smtp_dropped",
                        )
                        continue
                    raise classify(exc, host=host) from exc
                except Exception as exc:
                    self._after_failure(exc)
                    raise classify(exc, host=host) from exc
                except BaseException:
                    self._drop()  # cancelled mid-transaction: the session state is unknown
                    raise
                self._last_used = time.monotonic()
                if errors:  # only possible with several recipients; keep the contract explicit
                    failed = next(iter(errors.values()))
                    raise classify(
                        aiosmtplib.SMTPRecipientRefused(failed.code, failed.message, recipient),
                        host=host,
                    )
                self.metrics.inc("smtp.sent")
                return
        raise AssertionError("unreachable")

    def _after_failure(self, exc: BaseException) -> None:
        # A rejected message leaves a healthy session (aiosmtplib sends RSET); anything
        # else may leave it half-way through a transaction, so start afresh next time.
        if not (
            isinstance(exc, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused)
            and self.connected
        ):
            self._drop()

    async def close(self) -> None:
        """Say QUIT (bounded) and close."""
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is None:
                return
            if smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await asyncio.wait_for(smtp.quit(), timeout=self.config.connect_timeout_secs)
            smtp.close()
