"""SmtpTransport against the aiosmtpd fixture: security modes, AUTH, reuse, failures."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from prx_channel_email._net.smtp import SmtpFailure, SmtpTransport
from prx_channel_email._outbound.compose import compose
from prx_channel_email._support.observability import Metrics
from tests.outbound_helpers import smtp_config
from tests.servers.proxy import TcpProxy
from tests.servers.smtp import SmtpServer

RCPT = "ann@people.example"


def raw_for(config: object, text: str = "hello") -> tuple[str, bytes]:
    out = compose(config, content=text, recipient=RCPT)  # type: ignore[arg-type]
    return out.message_id, out.raw


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_send_over_tls_modes(tmp_path: Path, smtp_server: SmtpServer, security: str) -> None:
    config = smtp_config(tmp_path, smtp_server, security=security)  # type: ignore[arg-type]
    transport = SmtpTransport(config)
    mid, raw = raw_for(config)
    try:
        await transport.send(config.from_address, RCPT, raw)
    finally:
        await transport.close()
    [got] = smtp_server.messages
    assert got.listener == security
    assert got.tls is True
    assert got.auth_login == smtp_server.username
    assert got.rcpt_tos == (RCPT,)
    assert got.mail_from == config.from_address
    assert got.message()["Message-ID"] == mid


async def test_auto_security_from_port_and_tls_flag(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """smtp_security=auto on a non-465 port with smtp_tls=true means STARTTLS."""
    config = smtp_config(tmp_path, smtp_server, security="starttls", smtp_security="auto")
    assert config.smtp_effective_security == "starttls"
    transport = SmtpTransport(config)
    try:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    finally:
        await transport.close()
    assert [m.listener for m in smtp_server.messages] == ["starttls"]


async def test_untrusted_certificate_is_refused(
    tmp_path: Path, smtp_server: SmtpServer, unrelated_ca_file: Path
) -> None:
    config = smtp_config(tmp_path, smtp_server, ca_file=unrelated_ca_file)
    transport = SmtpTransport(config)
    with pytest.raises(SmtpFailure) as info:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    await transport.close()
    assert info.value.permanent and info.value.code == "tls_verify_failed"
    assert "ca_file" in str(info.value)
    assert smtp_server.messages == [] and smtp_server.auth_attempts == []


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_bad_password_is_a_permanent_auth_failure(
    tmp_path: Path, smtp_server: SmtpServer, security: str
) -> None:
    config = smtp_config(tmp_path, smtp_server, security=security, password="wrong")  # type: ignore[arg-type]
    transport = SmtpTransport(config)
    with pytest.raises(SmtpFailure) as info:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    await transport.close()
    failure = info.value
    assert failure.permanent and failure.auth and failure.code == "auth_failed"
    assert failure.smtp_code == 535
    assert "wrong" not in str(failure)  # never echo the secret
    assert [a.success for a in smtp_server.auth_attempts] == [False]
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    ("script", "permanent", "code"),
    [
        ("550 5.1.1 no such user", True, 550),
        ("451 4.3.0 try later", False, 451),
    ],
)
async def test_reply_codes_are_classified(
    tmp_path: Path, smtp_server: SmtpServer, script: str, permanent: bool, code: int
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.script_rcpt([script])
    transport = SmtpTransport(config)
    with pytest.raises(SmtpFailure) as info:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    assert info.value.permanent is permanent and info.value.smtp_code == code
    # The session survives a rejection: the next message goes out on it.
    await transport.send(config.from_address, RCPT, raw_for(config)[1])
    await transport.close()
    assert len(smtp_server.messages) == 1


async def test_burst_reuses_one_connection_and_reopens_after_drop(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy("127.0.0.1", smtp_server.tls_port)
    config = smtp_config(tmp_path, smtp_server, smtp_port=p.port)
    metrics = Metrics()
    transport = SmtpTransport(config, metrics)
    try:
        for i in range(5):
            await transport.send(config.from_address, RCPT, raw_for(config, f"m{i}")[1])
        assert p.connections_accepted == 1
        p.cut()  # the server side goes away between two replies
        await transport.send(config.from_address, RCPT, raw_for(config, "after cut")[1])
    finally:
        await transport.close()
    assert p.connections_accepted == 2
    assert metrics.get("smtp.reconnects") == 1
    assert len(smtp_server.messages) == 6
    assert [a.success for a in smtp_server.auth_attempts] == [True, True]


async def test_silent_path_times_out_as_transient(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy("127.0.0.1", smtp_server.tls_port)
    config = smtp_config(
        tmp_path, smtp_server, smtp_port=p.port, connect_timeout_secs=0.3, command_timeout_secs=0.3
    )
    p.freeze()
    transport = SmtpTransport(config)
    with pytest.raises(SmtpFailure) as info:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    await transport.close()
    assert not info.value.permanent
    assert info.value.code in {"smtp_timeout", "smtp_connection"}


async def test_refused_connection_is_transient(tmp_path: Path, smtp_server: SmtpServer) -> None:
    p = TcpProxy("127.0.0.1", smtp_server.tls_port)
    p.start()
    port = p.port
    p.stop()  # nothing listens there any more
    config = smtp_config(tmp_path, smtp_server, smtp_port=port)
    transport = SmtpTransport(config)
    with pytest.raises(SmtpFailure) as info:
        await transport.send(config.from_address, RCPT, raw_for(config)[1])
    await transport.close()
    assert not info.value.permanent and info.value.code == "smtp_connection"


async def test_missing_starttls_is_refused_not_downgraded(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """A server (or a man in the middle) that hides STARTTLS gets no plaintext password."""

    class Sink:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plain = Controller(Sink(), hostname="127.0.0.1", port=port, auth_require_tls=False)
    plain.start()
    try:
        config = smtp_config(tmp_path, smtp_server, security="starttls", smtp_port=port)
        transport = SmtpTransport(config)
        with pytest.raises(SmtpFailure) as info:
            await transport.send(config.from_address, RCPT, raw_for(config)[1])
        await transport.close()
    finally:
        plain.stop()
    assert info.value.permanent and info.value.code == "starttls_unavailable"
