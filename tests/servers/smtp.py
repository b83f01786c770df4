"""An in-process SMTP submission server (aiosmtpd) with scriptable faults.

:class:`SmtpServer` runs two listeners on free loopback ports, in a background
thread with its own event loop (so tests on any loop, or none, can use it):

* ``tls_port``      - implicit TLS ("SMTPS", like port 465);
* ``starttls_port`` - plain listener that offers STARTTLS (like port 587).

Both use a certificate from the test CA (``ca_file``) and accept AUTH PLAIN and
AUTH LOGIN with ``username``/``password``. Every accepted message is recorded
as a :class:`ReceivedMessage`; :meth:`SmtpServer.wait_for_messages` blocks on a
condition variable with a bounded timeout.

Faults are scripted per command: the next RCPT/DATA/MAIL commands can be
answered with given replies (:meth:`script_rcpt` ...), one recipient can be
refused permanently (:meth:`reject_recipient`), and the connection can be cut
right after a message was accepted, before the client sees the 250
(:meth:`drop_after_data`).
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .certs import TestPKI
from .loop_thread import LoopThread

DEFAULT_USERNAME = "sender@example.test"
DEFAULT_PASSWORD = "smtp-pass-word"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted (answered 250 to DATA, or would have)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    """The DATA payload exactly as received (CRLF line endings, dot-unstuffed)."""
    auth_login: str | None
    """The AUTH username of the session, or None if it did not authenticate."""
    listener: str
    """``"tls"`` (implicit TLS port) or ``"starttls"`` (STARTTLS port)."""
    tls: bool
    """Whether the message was sent over TLS (implicit or after STARTTLS)."""

    def message(self) -> EmailMessage:
        """``raw`` parsed with the modern email policy."""
        return email.message_from_bytes(self.raw, policy=email.policy.default)


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH command: who tried, whether it succeeded, on which listener."""

    login: str
    success: bool
    listener: str


class _Session(Session):
    """aiosmtpd's Session without the deprecation warning on ``login_data``.

    aiosmtpd itself sets ``login_data`` on every successful AUTH and warns about
    it; under ``-W error`` that warning would break AUTH in the server thread.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SMTP(SMTP):
    """aiosmtpd's SMTP with a quiet session and a correct notion of implicit TLS."""

    def __init__(self, handler: _Handler, *, allow_auth_without_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, auth_require_tls=True, **kwargs)
        # Set after construction: passing auth_require_tls=False together with
        # auth_required=True makes aiosmtpd emit a UserWarning. On the implicit-TLS
        # listener AUTH *is* over TLS, but aiosmtpd only recognises STARTTLS.
        self._auth_require_tls = not allow_auth_without_tls

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        # Whether the client said QUIT before the connection ended (politeness).
        handler = self.event_handler
        if isinstance(handler, _Handler):
            handler.owner._note_ended(handler.listener, getattr(self.session, "quit", False))
        super().connection_lost(exc)


class _Handler:
    """aiosmtpd handler; all state lives in the owning SmtpServer."""

    def __init__(self, owner: SmtpServer, listener: str) -> None:
        self.owner = owner
        self.listener = listener

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        session.quit = True  # type: ignore[attr-defined]
        return "221 Bye"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """XOAUTH2 (offered only with an ``oauth_validator``): on a bad token, the
        error challenge a real provider sends, then 535 after the client's empty line."""
        if len(args) > 1:
            blob = args[1].encode()
        else:
            answer = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=False)
            blob = base64.b64encode(answer)
        try:
            text = base64.b64decode(blob, validate=True).decode()
            fields = dict(p.split("=", 1) for p in text.split("\x01") if "=" in p)
            user, token = fields["user"], fields["auth"].removeprefix("Bearer ")
        except (ValueError, KeyError):
            return AuthResult(success=False, handled=False)
        validator = self.owner.oauth_validator
        ok = validator is not None and await asyncio.to_thread(validator, user, token)
        with self.owner._cond:
            self.owner._auth_attempts.append(AuthAttempt(user, ok, self.listener))
            self.owner._cond.notify_all()
        if ok:
            return AuthResult(
                success=True, handled=False, auth_data=LoginPassword(user.encode(), b"")
            )
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
        await server.challenge_auth(error)  # the client answers with an empty line
        return AuthResult(
            success=False, handled=False, message="535 5.7.3 Authentication unsuccessful"
        )

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        scripted = self.owner._next_scripted("MAIL")
        if scripted is not None:
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        scripted = self.owner._next_scripted("RCPT")
        if scripted is not None:
            return scripted
        rejection = self.owner._rejection_for(address)
        if rejection is not None:
            return rejection
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = self.owner._next_scripted("DATA")
        if scripted is not None:
            return scripted
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover - decode_data is False
            raw = raw.encode()
        auth = session.auth_data
        login: str | None = None
        if isinstance(auth, LoginPassword):
            login = auth.login.decode(errors="replace")
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        message = ReceivedMessage(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=bytes(raw),
            auth_login=login,
            listener=self.listener,
            tls=tls,
        )
        relay = self.owner._relay
        if relay is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, relay, message)
            except Exception as exc:  # report relay trouble to the client, like an MTA
                self.owner._relay_errors.append(exc)
                return "451 4.3.0 relay failed"
        self.owner._record(message)
        if self.owner._take_drop() and isinstance(transport, asyncio.Transport):
            # Simulate a server that committed the message and then died before
            # replying: the client never sees the 250.
            transport.abort()
        return "250 2.0.0 OK queued"


class SmtpServer:
    """Two aiosmtpd listeners (implicit TLS and STARTTLS). See the module docstring.

    ``require_starttls`` makes the STARTTLS listener refuse everything but
    EHLO/STARTTLS/QUIT before TLS. ``auth_required`` refuses MAIL before AUTH.
    ``auth_require_tls=False`` also allows AUTH over the unencrypted STARTTLS
    listener (before STARTTLS). The implicit-TLS listener always allows AUTH.
    """

    def __init__(
        self,
        pki: TestPKI,
        *,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        require_starttls: bool = True,
        auth_required: bool = True,
        auth_require_tls: bool = True,
        host: str = "127.0.0.1",
        oauth_validator: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.pki = pki
        #: (user, access token) -> valid? With it, AUTH XOAUTH2 is offered too.
        self.oauth_validator = oauth_validator
        self.username = username
        self.password = password
        self._default_credentials = (username, password)
        self.require_starttls = require_starttls
        self.auth_required = auth_required
        self.auth_require_tls = auth_require_tls
        self.host = host
        self.tls_port = 0
        self.starttls_port = 0
        self._cond = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._scripts: dict[str, deque[str]] = {"MAIL": deque(), "RCPT": deque(), "DATA": deque()}
        self._rejections: dict[str, str] = {}
        self._drops = 0
        self._ended: list[tuple[str, bool]] = []
        self._relay: Callable[[ReceivedMessage], None] | None = None
        self._relay_errors: list[BaseException] = []
        self._runner = LoopThread("smtp-fixture")
        self._servers: list[asyncio.AbstractServer] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA that signed the server certificate."""
        return self.pki.ca_file

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start the loop thread and both listeners; return once they accept."""
        self._runner.start(self._start_servers, timeout, self._shutdown)

    async def _start_servers(self) -> None:
        tls_server = await asyncio.get_running_loop().create_server(
            lambda: self._smtp("tls"), self.host, 0, ssl=self.pki.server_context()
        )
        starttls_server = await asyncio.get_running_loop().create_server(
            lambda: self._smtp("starttls"), self.host, 0
        )
        self._servers = [tls_server, starttls_server]
        self.tls_port = tls_server.sockets[0].getsockname()[1]
        self.starttls_port = starttls_server.sockets[0].getsockname()[1]

    def _smtp(self, listener: str) -> SMTP:
        common: dict[str, Any] = {
            "hostname": "smtp.example.test",
            "ident": "prx-test SMTP",
            "authenticator": self._authenticate,
            "auth_required": self.auth_required,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "timeout": 60,
            "auth_exclude_mechanism": [] if self.oauth_validator else ["XOAUTH2"],
        }
        if listener == "tls":
            return _SMTP(_Handler(self, listener), allow_auth_without_tls=True, **common)
        return _SMTP(
            _Handler(self, listener),
            tls_context=self.pki.server_context(),
            require_starttls=self.require_starttls,
            allow_auth_without_tls=not self.auth_require_tls,
            **common,
        )

    def stop(self) -> None:
        """Close the listeners and all connections, and stop the loop thread."""
        self._runner.stop(self._shutdown)
        self._servers = []

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
            if hasattr(server, "close_clients"):  # Python >= 3.12
                server.close_clients()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ auth

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        # handled=False: aiosmtpd then sends 235 / 535 itself. (handled=True on
        # failure would send nothing and leave the client waiting forever.)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode(errors="replace")
        password = auth_data.password.decode(errors="replace")
        with self._cond:
            ok = login == self.username and password == self.password
            attempt = AuthAttempt(login=login, success=ok, listener=self._listener_of(server))
            self._auth_attempts.append(attempt)
            self._cond.notify_all()
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    @staticmethod
    def _listener_of(server: SMTP) -> str:
        handler = server.event_handler
        return handler.listener if isinstance(handler, _Handler) else "?"

    def set_credentials(self, username: str, password: str) -> None:
        """Change the accepted AUTH username/password (affects new AUTH commands)."""
        with self._cond:
            self.username = username
            self.password = password

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        """Every AUTH attempt so far, in order."""
        with self._cond:
            return list(self._auth_attempts)

    # ------------------------------------------------------------------ messages

    def _record(self, message: ReceivedMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages accepted so far, in order."""
        with self._cond:
            return list(self._messages)

    def wait_for_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages were accepted; return all of them.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"SMTP fixture got {len(self._messages)} message(s), "
                    f"wanted {count} within {timeout}s"
                )
            return list(self._messages)

    async def await_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """:meth:`wait_for_messages` for async tests (waits in a worker thread)."""
        return await asyncio.to_thread(self.wait_for_messages, count, timeout)

    def assert_no_more_messages(self, count: int, within: float = 0.5) -> None:
        """Assert that no more than ``count`` messages arrive within ``within`` seconds.

        For "the client must not send a duplicate" checks; this necessarily waits
        the full ``within`` seconds.
        """
        with self._cond:
            self._cond.wait_for(lambda: len(self._messages) > count, within)
            got = len(self._messages)
        if got > count:
            raise AssertionError(f"expected {count} message(s), SMTP fixture got {got}")

    # ------------------------------------------------------------------ faults

    def script_mail(self, replies: Iterable[str]) -> None:
        """Answer the next MAIL FROM commands with ``replies`` (one each), then resume."""
        self._script("MAIL", replies)

    def script_rcpt(self, replies: Iterable[str]) -> None:
        """Answer the next RCPT TO commands with ``replies``, e.g. ``["451 4.3.0 try later"]``."""
        self._script("RCPT", replies)

    def script_data(self, replies: Iterable[str]) -> None:
        """Answer the next DATA payloads with ``replies`` (message not recorded)."""
        self._script("DATA", replies)

    def _script(self, command: str, replies: Iterable[str]) -> None:
        replies = list(replies)
        for reply in replies:
            if len(reply) < 3 or not reply[:3].isdigit():
                raise ValueError(f"SMTP reply must start with a 3-digit code: {reply!r}")
        with self._cond:
            self._scripts[command].extend(replies)

    def _next_scripted(self, command: str) -> str | None:
        with self._cond:
            queue = self._scripts[command]
            return queue.popleft() if queue else None

    def pending_script(self, command: str) -> list[str]:
        """Scripted replies for ``command`` ("MAIL"/"RCPT"/"DATA") not yet used."""
        with self._cond:
            return list(self._scripts[command.upper()])

    def reject_recipient(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Refuse RCPT TO ``address`` (case-insensitive) with ``reply``, every time."""
        with self._cond:
            self._rejections[address.lower()] = reply

    def _rejection_for(self, address: str) -> str | None:
        with self._cond:
            return self._rejections.get(address.lower())

    def drop_after_data(self, count: int = 1) -> None:
        """For the next ``count`` messages: record them, then abort the connection
        before the 250 reply is sent (a server that crashed after accepting)."""
        with self._cond:
            self._drops += count

    def _take_drop(self) -> bool:
        with self._cond:
            if self._drops > 0:
                self._drops -= 1
                return True
            return False

    def relay_to(self, callback: Callable[[ReceivedMessage], None] | None) -> None:
        """Call ``callback(message)`` (in a worker thread) for each message before
        accepting it, e.g. to deliver it into Dovecot. If it raises, the client gets
        ``451 4.3.0`` and the message is not recorded; see :attr:`relay_errors`."""
        with self._cond:
            self._relay = callback

    @property
    def relay_errors(self) -> list[BaseException]:
        """Exceptions raised by the relay callback."""
        with self._cond:
            return list(self._relay_errors)

    def reset(self) -> None:
        """Forget messages, auth attempts, scripts, rejections, drops and the relay,
        and restore the constructor's credentials. Listeners keep running."""
        with self._cond:
            self._messages.clear()
            self._auth_attempts.clear()
            for queue in self._scripts.values():
                queue.clear()
            self._rejections.clear()
            self._drops = 0
            self._ended.clear()
            self._relay = None
            self._relay_errors.clear()
            self.username, self.password = self._default_credentials

    def _note_ended(self, listener: str, quit: bool) -> None:
        with self._cond:
            self._ended.append((listener, quit))
            self._cond.notify_all()

    def wait_for_ended_connections(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[tuple[str, bool]]:
        """Block until ``count`` client connections have ended; each is (listener,
        whether the client said QUIT first)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._ended) >= count, timeout):
                raise TimeoutError(f"{len(self._ended)} connection(s) ended, wanted {count}")
            return list(self._ended)

    def wait_for_auth_attempts(self, count: int = 1, timeout: float = 10.0) -> list[AuthAttempt]:
        """Block until at least ``count`` AUTH attempts happened; return them all.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._auth_attempts) >= count, timeout):
                raise TimeoutError(
                    f"SMTP fixture saw {len(self._auth_attempts)} AUTH attempt(s), "
                    f"wanted {count} within {timeout}s"
                )
            return list(self._auth_attempts)
