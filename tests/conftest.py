"""Shared pytest fixtures: real Dovecot, an SMTP sink and a fault-injecting TCP proxy.

Session-scoped servers start on first use only, so tests that need none of them
pay nothing. Servers are never skipped when missing: a missing ``dovecot``
binary fails the tests that need it, with a message saying how to install it.

Fixtures
--------
``pki``              session: test CA + server cert (``pki.ca_file`` for clients).
``dovecot``          session: Dovecot with IDLE (:class:`DovecotServer`).
``dovecot_noidle``   session: Dovecot that does not advertise IDLE.
``account``          function: a fresh user on ``dovecot`` (empty mailbox).
``noidle_account``   function: a fresh user on ``dovecot_noidle``.
``smtp_server``      session: :class:`SmtpServer`; reset before each test using it.
``smtp_relay``       function: ``smtp_server`` that delivers each message into
                     ``dovecot`` (to recipients that are Dovecot users).
``proxy``            function: factory ``proxy(host, port) -> TcpProxy``.
``unrelated_ca_file`` session: a CA file that did NOT sign the servers' cert.
``chat_model``       function: :class:`EchoChatModel`, an OpenAI-compatible echo on loopback.
``oauth_server``     session: a local OAuth 2.0 authorization server; reset per test.
``dovecot_oauth``    session: Dovecot whose XOAUTH2/OAUTHBEARER logins are checked
                     by an ``oauth2`` passdb through ``oauth_server``'s introspection.
``smtp_oauth``       session: SMTP fixture that also offers AUTH XOAUTH2, checked
                     against ``oauth_server``'s introspection endpoint.
``dovecot_courier``  session: Dovecot with Courier's folder layout (``INBOX.`` prefix).
``quirk_proxy``      function: factory ``quirk_proxy(dovecot, quirks)`` -> an IMAPS
                     :class:`QuirkProxy` that behaves like Courier, Cyrus, Gmail ...

If a test stops or restarts a session server, the next test that uses it gets
it running again (see ``_keep_servers_usable``).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.chat_model import EchoChatModel
from tests.servers.certs import TestPKI, make_pki, make_unrelated_ca
from tests.servers.dovecot import Account, DovecotError, DovecotServer
from tests.servers.oauth_server import OAuthServer
from tests.servers.postgres import PgBouncer, PostgresServer
from tests.servers.proxy import TcpProxy
from tests.servers.quirk_proxy import QuirkProxy
from tests.servers.smtp import ReceivedMessage, SmtpServer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """One test CA and a server certificate for localhost/127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def unrelated_ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that signed nothing the servers present."""
    return make_unrelated_ca(tmp_path_factory.mktemp("unrelated-ca"))


def _dovecot(pki: TestPKI, *, idle: bool, oauth: str | None = None) -> Iterator[DovecotServer]:
    try:
        server = DovecotServer(idle=idle, pki=pki, oauth_introspection_url=oauth)
    except DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        try:
            server.start()
        except DovecotError as exc:
            pytest.fail(f"Dovecot did not start: {exc}", pytrace=False)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def dovecot(pki: TestPKI) -> Iterator[DovecotServer]:
    """A real Dovecot with IMAP (+STARTTLS), IMAPS and LMTP on loopback."""
    yield from _dovecot(pki, idle=True)


@pytest.fixture(scope="session")
def dovecot_noidle(pki: TestPKI) -> Iterator[DovecotServer]:
    """Like ``dovecot`` but IDLE is not advertised, before or after login."""
    yield from _dovecot(pki, idle=False)


@pytest.fixture(scope="session")
def dovecot_courier(pki: TestPKI) -> Iterator[DovecotServer]:
    """Dovecot with Courier's folder layout: every folder under ``INBOX.``, ``.`` delimiter."""
    try:
        server = DovecotServer(pki=pki, namespace_prefix="INBOX.", separator=".")
        server.start()
    except DovecotError as exc:
        pytest.fail(f"Dovecot did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def quirk_proxy(pki: TestPKI) -> Iterator[Callable[..., QuirkProxy]]:
    """Factory: ``quirk_proxy(dovecot, quirks, greeting=None)``, an IMAPS endpoint in
    front of that Dovecot behaving like another server (tests/servers/quirk_proxy.py)."""
    started: list[QuirkProxy] = []

    def make(server: DovecotServer, quirks: Iterable[str] = (), **kw: Any) -> QuirkProxy:
        proxy = QuirkProxy(server.host, server.imap_port, pki, quirks, **kw)
        proxy.start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def account(dovecot: DovecotServer) -> Account:
    """A new user on ``dovecot`` with an empty mailbox."""
    return dovecot.add_user()


@pytest.fixture
def noidle_account(dovecot_noidle: DovecotServer) -> Account:
    """A new user on ``dovecot_noidle`` with an empty mailbox."""
    return dovecot_noidle.add_user()


@pytest.fixture(scope="session")
def smtp_server(pki: TestPKI) -> Iterator[SmtpServer]:
    """SMTP listeners (implicit TLS and STARTTLS) that record what they accept.

    Reset (messages, scripts, credentials, relay) before every test that uses it.
    """
    server = SmtpServer(pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on loopback (shared state, replicas)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A ``state_url`` naming a fresh, empty database of its own."""
    return postgres.url(postgres.new_database())


@pytest.fixture(scope="session")
def pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of the cluster."""
    with PgBouncer(postgres) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def oauth_server() -> Iterator[OAuthServer]:
    server = OAuthServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dovecot_oauth(pki: TestPKI, oauth_server: OAuthServer) -> Iterator[DovecotServer]:
    yield from _dovecot(pki, idle=True, oauth=f"{oauth_server.url}/introspect")


@pytest.fixture(scope="session")
def smtp_oauth(pki: TestPKI, oauth_server: OAuthServer) -> Iterator[SmtpServer]:
    def introspect(user: str, token: str) -> bool:
        # Over HTTP, as a real submission server would ask (RFC 7662).
        body = urllib.parse.urlencode({"token": token}).encode()
        url = f"{oauth_server.url}/introspect"
        with urllib.request.urlopen(url, data=body, timeout=5) as resp:
            info = json.loads(resp.read())
        return bool(info.get("active")) and info.get("username") == user

    server = SmtpServer(pki, oauth_validator=introspect)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_relay(smtp_server: SmtpServer, dovecot: DovecotServer) -> SmtpServer:
    """``smtp_server`` that also delivers every accepted message into ``dovecot``.

    Recipients that are not Dovecot users are accepted but not delivered.
    """

    def relay(message: ReceivedMessage) -> None:
        users = {a.address.lower() for a in dovecot.accounts}
        for rcpt in message.rcpt_tos:
            if rcpt.lower() in users:
                dovecot.deliver(rcpt, message.raw, mail_from=message.mail_from)

    smtp_server.relay_to(relay)
    return smtp_server


@pytest.fixture
def proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """Factory: ``proxy(host, port)`` starts a :class:`TcpProxy` to that target.

    All proxies made in a test are stopped at its end.
    """
    made: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        p = TcpProxy(host, port)
        p.start()
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.stop()


@pytest.fixture
def chat_model() -> Iterator[EchoChatModel]:
    """A scripted echo chat model on loopback (the host-integration tests' stand-in LLM)."""
    model = EchoChatModel().start()
    try:
        yield model
    finally:
        model.stop()


@pytest.fixture(autouse=True)
def _keep_servers_usable(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give each test clean session servers without starting unused ones.

    Resets ``smtp_server`` before a test that uses it, and restarts a Dovecot
    that an earlier test stopped.
    """
    names = request.fixturenames
    for name in ("smtp_server", "smtp_oauth", "oauth_server"):
        if name in names:
            request.getfixturevalue(name).reset()
    for name in ("dovecot", "dovecot_noidle", "dovecot_oauth"):
        if name in names:
            server: DovecotServer = request.getfixturevalue(name)
            if not server.running:
                server.start()
    yield
