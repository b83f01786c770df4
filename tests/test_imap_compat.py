"""The contract between prx_channel_email and aioimaplib's internals.

Everything in ``_imap_compat.py`` leans on attributes aioimaplib does not promise
to keep. When an upgrade changes one of them, a test here fails with a message
naming it, instead of the channel misparsing mail at run time. The behaviour is
driven byte by byte through a recording transport (the parser is what is under
test), and once end to end against the real Dovecot.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import warnings
from typing import Any

import pytest

from prx_channel_email._net import imap_compat as compat
from prx_channel_email.errors import ChannelError
from tests.servers.dovecot import Account, DovecotServer


class RecordingTransport(asyncio.Transport):
    """Keeps what the client wrote; the test plays the server."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def lines(self) -> list[bytes]:
        return b"".join(self.written).split(b"\r\n")

    def last_tag(self) -> str:
        for line in reversed(self.lines()):
            if line and line != b"DONE":
                return line.split(b" ", 1)[0].decode()
        raise AssertionError("the client sent no command")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _connected(state_line: bytes = b"* OK ready\r\n") -> tuple[Any, RecordingTransport]:
    """A protocol past the greeting (and aioimaplib's CAPABILITY that follows it)."""
    proto = compat.ImapProtocol(asyncio.get_running_loop())
    transport = RecordingTransport()
    proto.connection_made(transport)
    proto.data_received(state_line)
    await _settle()
    tag = transport.last_tag()
    proto.data_received(b"* CAPABILITY IMAP4rev1 IDLE SASL-IR\r\n" + f"{tag} OK done\r\n".encode())
    await asyncio.wait_for(proto.wait_greeting(), 5)
    return proto, transport


async def _selected() -> tuple[Any, RecordingTransport]:
    proto, transport = await _connected(b"* PREAUTH hello\r\n")
    proto.mark_selected()
    return proto, transport


def _fetch_answer(tag: str, count: int) -> bytes:
    parts = []
    for uid in range(1, count + 1):
        body = f"Subject: {uid}\r\n\r\nbody {uid} (with a paren\r\n".encode()
        parts.append(
            f"* {uid} FETCH (UID {uid} BODY[] {{{len(body)}}}\r\n".encode() + body + b")\r\n"
        )
    return b"".join(parts) + f"{tag} OK FETCH completed\r\n".encode()


def test_the_installed_aioimaplib_is_in_the_tested_range() -> None:
    version = compat.installed_version()
    low, high = compat.TESTED_RANGE
    assert compat.version_in_tested_range(version), (
        f"aioimaplib {version} is outside the tested range {low}..{high}: run this file,"
        " check _imap_compat.py against the new release, then widen TESTED_RANGE"
    )


def test_every_internal_we_rely_on_is_still_there() -> None:
    assert compat.contract_problems() == []

    async def fresh() -> list[str]:
        return compat.instance_problems(compat.ImapProtocol(asyncio.get_running_loop()))

    assert asyncio.run(fresh()) == []


def test_a_broken_contract_is_a_clear_channel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_PROBLEMS", ["IMAP4ClientProtocol._handle_responses is gone"])
    with pytest.raises(ChannelError) as info:
        compat.ensure_compatible()
    assert info.value.code == "imap_library_incompatible"
    assert "_handle_responses is gone" in str(info.value)


def test_an_untested_version_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "installed_version", lambda: (9, 0, 0))
    monkeypatch.setattr(compat, "_VERSION_CHECKED", False)
    with pytest.warns(RuntimeWarning, match=r"aioimaplib 9\.0\.0 is outside the range"):
        compat.ensure_compatible()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.ensure_compatible()


async def test_a_huge_fetch_answer_parses_without_recursion() -> None:
    proto, transport = await _selected()
    pending = asyncio.ensure_future(proto.command("UID FETCH", "1:4000", "(UID BODY[])"))
    await _settle()
    proto.data_received(_fetch_answer(transport.last_tag(), 4000))
    resp = await asyncio.wait_for(pending, 5)
    assert resp.result == "OK"
    literals = [bytes(x) for x in resp.lines if not isinstance(x, bytes)]
    assert len(literals) == 4000
    assert literals[-1].endswith(b"body 4000 (with a paren\r\n")


@pytest.mark.parametrize("chunk", [1, 7, 64])
async def test_answers_split_anywhere_reassemble(chunk: int) -> None:
    proto, transport = await _selected()
    pending = asyncio.ensure_future(proto.command("UID FETCH", "1:3", "(UID BODY[])"))
    await _settle()
    data = _fetch_answer(transport.last_tag(), 3)
    for i in range(0, len(data), chunk):
        proto.data_received(data[i : i + chunk])
        if i + chunk < len(data) and not data[: i + chunk].endswith(b"\r\n"):
            assert proto.has_unread_bytes or proto.current_command is not None
    resp = await asyncio.wait_for(pending, 5)
    literals = [bytes(x) for x in resp.lines if not isinstance(x, bytes)]
    assert [lit.split(b"\r\n")[0] for lit in literals] == [
        b"Subject: 1",
        b"Subject: 2",
        b"Subject: 3",
    ]
    assert not proto.has_unread_bytes


async def test_exists_and_bye_are_seen_while_a_command_runs() -> None:
    proto, transport = await _selected()
    pending = asyncio.ensure_future(proto.command("NOOP"))
    await _settle()
    proto.data_received(b"* 3 EXISTS\r\n")
    assert proto.changed.is_set()
    proto.data_received(f"{transport.last_tag()} OK NOOP done\r\n".encode())
    assert (await asyncio.wait_for(pending, 5)).result == "OK"
    assert not proto.closed.is_set()
    proto.data_received(b"* BYE shutting down\r\n")
    assert proto.closed.is_set()
    assert proto.bye == "shutting down"


async def test_idle_continuation_pushes_and_done() -> None:
    proto, transport = await _selected()
    task = proto.start_idle()
    await _settle()
    assert transport.lines()[-2].endswith(b" IDLE")
    tag = transport.last_tag()
    accepted = asyncio.ensure_future(proto.idle_accepted())
    proto.data_received(b"+ idling\r\n")
    await asyncio.wait_for(accepted, 5)
    proto.data_received(b"* 4 EXISTS\r\n* 1 RECENT\r\n")
    assert proto.changed.is_set()
    assert not proto.idle_queue.empty()
    proto.drop_idle_pushes()
    assert proto.idle_queue.empty()
    proto.send_idle_done()
    assert transport.lines()[-2] == b"DONE"
    proto.data_received(f"{tag} OK IDLE terminated\r\n".encode())
    assert (await asyncio.wait_for(task, 5)).result == "OK"


async def test_bytes_after_a_line_are_kept_unread() -> None:
    proto, _ = await _selected()
    proto.data_received(b"* 5 EXI")
    assert proto.has_unread_bytes


async def test_line_breaks_in_arguments_are_refused_before_sending() -> None:
    proto, transport = await _selected()
    before = len(transport.written)
    with pytest.raises(ValueError):
        proto.command("SELECT", "INBOX\r\nA1 DELETE INBOX")
    assert len(transport.written) == before


def test_quote_escapes() -> None:
    assert compat.quote('a "b" \\c') == '"a \\"b\\" \\\\c"'


async def test_sasl_error_challenge_is_answered_and_reported() -> None:
    proto, transport = await _connected()
    pending = asyncio.ensure_future(
        proto.authenticate("XOAUTH2", "dG9rZW4=", sasl_ir=True, abort_reply="")
    )
    await _settle()
    tag = transport.last_tag()
    assert transport.lines()[-2] == f"{tag} AUTHENTICATE XOAUTH2 dG9rZW4=".encode()
    proto.data_received(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
    assert transport.lines()[-2] == b""  # the empty reply that ends the exchange
    proto.data_received(f"{tag} NO [AUTHENTICATIONFAILED] invalid\r\n".encode())
    resp, challenges = await asyncio.wait_for(pending, 5)
    assert resp.result == "NO"
    assert challenges == ["eyJzdGF0dXMiOiI0MDEifQ=="]
    assert proto.state == "NONAUTH"


async def test_sasl_without_initial_response_answers_the_first_continuation() -> None:
    proto, transport = await _connected()
    pending = asyncio.ensure_future(proto.authenticate("OAUTHBEARER", "aGk=", sasl_ir=False))
    await _settle()
    tag = transport.last_tag()
    assert transport.lines()[-2] == f"{tag} AUTHENTICATE OAUTHBEARER".encode()
    proto.data_received(b"+ \r\n")
    assert transport.lines()[-2] == b"aGk="
    proto.data_received(f"{tag} OK logged in\r\n".encode())
    resp, challenges = await asyncio.wait_for(pending, 5)
    assert (resp.result, challenges) == ("OK", [])
    assert proto.state == "AUTH"


@pytest.mark.parametrize("good", [True, False])
async def test_authenticate_against_dovecot(
    dovecot: DovecotServer, account: Account, good: bool
) -> None:
    """SASL PLAIN through the compat layer on a real server (the path OAuth uses)."""
    loop = asyncio.get_running_loop()
    proto = compat.ImapProtocol(loop)
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    await asyncio.wait_for(
        loop.create_connection(
            lambda: proto,
            dovecot.host,
            dovecot.imaps_port,
            ssl=ctx,
            server_hostname=dovecot.host,
        ),
        10,
    )
    try:
        await asyncio.wait_for(proto.wait_greeting(), 10)
        secret = account.password if good else account.password + "-wrong"
        plain = base64.b64encode(f"\0{account.username}\0{secret}".encode()).decode()
        resp, _ = await asyncio.wait_for(
            proto.authenticate("PLAIN", plain, sasl_ir="SASL-IR" in proto.capability_set), 10
        )
        assert resp.result == ("OK" if good else "NO")
        assert proto.state == ("AUTH" if good else "NONAUTH")
    finally:
        proto.transport.abort()
