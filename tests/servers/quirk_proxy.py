"""An IMAP proxy in front of Dovecot that behaves like the servers people run.

Dovecot follows the RFCs closely; Courier, Cyrus, Gmail and Exchange each leave
something out or add something. :class:`QuirkProxy` terminates TLS (with the
test CA's certificate, so clients verify it as they would a real server),
speaks plaintext IMAP to Dovecot's ``imap_port``, and rewrites what passes
through, one documented quirk at a time (:data:`QUIRKS`):

``no_uidnext``        SELECT answers without ``[UIDNEXT]`` (Courier)
``no_status_uidnext`` STATUS leaves UIDNEXT out too (forces the highest-UID fallback)
``no_move``           no MOVE capability; ``UID MOVE`` is refused (Courier)
``no_uidplus``        no UIDPLUS; no APPENDUID/COPYUID; ``UID EXPUNGE`` is refused
``no_esearch``        no ESEARCH; ``SEARCH RETURN (...)`` is refused
``silent_idle``       IDLE is advertised and accepted, but nothing is announced while
                      idling (Cyrus without ``idled``, Courier with IMAP_ENHANCEDIDLE=0
                      announce only on their own periodic check; this is the limit)
``gmail``             ``X-GM-EXT-1`` advertised; ``[Gmail]/Sent Mail`` carries ``\\Sent``

Always, like Courier: a UID set containing 0 is answered ``BAD Error in IMAP
command received by server.`` (Dovecot accepts it). The folder prefix ``INBOX.``
is not rewritten here: it is Dovecot's own namespace setting
(``DovecotServer(namespace_prefix="INBOX.", separator=".")``), a real server with
Courier's layout, which the proxy is then put in front of.

Every client command line (literals left out, the LOGIN password masked) is
recorded per connection in :attr:`QuirkProxy.sessions`, so tests can see what a
client sent, e.g. that it ended with LOGOUT.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .certs import TestPKI
from .proxy import TcpProxy

QUIRKS = frozenset(
    {
        "no_uidnext",
        "no_status_uidnext",
        "no_move",
        "no_uidplus",
        "no_esearch",
        "silent_idle",
        "gmail",
    }
)
GMAIL_SENT = "[Gmail]/Sent Mail"
COURIER_BAD = b"BAD Error in IMAP command received by server.\r\n"

_LITERAL_RE = re.compile(rb"\{(\d+)\+?\}\r\n$")
_CAPS_LINE_RE = re.compile(rb"^(\* CAPABILITY )(.*?)(\r\n)$", re.IGNORECASE)
_CAPS_CODE_RE = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_UIDNEXT_LINE_RE = re.compile(rb"^\* OK \[UIDNEXT \d+\]", re.IGNORECASE)
_STATUS_UIDNEXT_RE = re.compile(rb" ?UIDNEXT \d+ ?")
_UIDPLUS_CODE_RE = re.compile(rb"\[(?:APPENDUID|COPYUID) [^\]]*\] ?", re.IGNORECASE)
_UNTAGGED_RE = re.compile(rb"^\* ")
_LIST_RE = re.compile(rb"^(\* LIST \()([^)]*)(\) .*)$", re.IGNORECASE)
_SET_RE = re.compile(rb"^[\d:*,]+$")


@dataclass
class ProxySession:
    """One client connection: what the client sent, and whether it is over."""

    commands: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def names(self) -> list[str]:
        """The command names, upper case (``UID SEARCH`` counts as ``UID``)."""
        out = []
        for line in self.commands:
            parts = line.split(" ", 2)
            out.append(parts[1].upper() if len(parts) > 1 else parts[0].upper())
        return out


@dataclass
class _State:
    idle_tag: bytes | None = None
    idling: bool = False


class QuirkProxy(TcpProxy):
    """See the module docstring. Use as a context manager or start()/stop().

    A :class:`TcpProxy` (same lifecycle and counters) with a TLS listener whose
    relay reads IMAP and rewrites it instead of moving bytes.
    """

    def __init__(
        self,
        backend_host: str,
        backend_port: int,
        pki: TestPKI,
        quirks: Iterable[str] = (),
        *,
        greeting: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(backend_host, backend_port, host=host, ssl=pki.server_context())
        self.quirks = frozenset(quirks)
        unknown = self.quirks - QUIRKS
        if unknown:
            raise ValueError(f"unknown quirks: {sorted(unknown)}")
        self.greeting = greeting
        self.sessions: list[ProxySession] = []
        self._lock = threading.Lock()

    def finished_sessions(self) -> list[ProxySession]:
        with self._lock:
            return [s for s in self.sessions if s.closed]

    async def _relay(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> None:
        session = ProxySession()
        with self._lock:
            self.sessions.append(session)
        state = _State()
        try:
            await asyncio.gather(
                self._from_client(client_r, upstream_w, client_w, session, state),
                self._from_server(upstream_r, client_w, state),
                return_exceptions=True,
            )
        finally:
            with self._lock:
                session.closed = True

    async def _from_client(
        self,
        reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        session: ProxySession,
        state: _State,
    ) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    upstream.close()
                    return
                literal = _LITERAL_RE.search(line)
                shown = line.rstrip(b"\r\n").decode(errors="replace")
                words = line.split()
                if len(words) >= 3 and words[1].upper() == b"LOGIN":
                    shown = " ".join(shown.split(" ")[:3]) + " ***"
                if state.idle_tag is None or line.strip().upper() != b"DONE":
                    with self._lock:
                        session.commands.append(shown)
                refusal = None if literal else self._refuse(words)
                if refusal is not None:
                    client.write(words[0] + b" " + refusal)
                    await client.drain()
                    continue
                if len(words) >= 2 and words[1].upper() == b"IDLE":
                    state.idle_tag = words[0]
                upstream.write(line)
                await _pass_literals(reader, upstream, literal)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            upstream.transport.abort()

    def _refuse(self, words: list[bytes]) -> bytes | None:
        """The tagged answer the quirky server gives instead of running the command."""
        if len(words) < 2:
            return None
        name = words[1].upper()
        sub = words[2].upper() if name == b"UID" and len(words) > 2 else None
        q = self.quirks
        if "no_move" in q and (name == b"MOVE" or sub == b"MOVE"):
            return b"BAD Unknown command\r\n"
        if "no_uidplus" in q and sub == b"EXPUNGE":
            return b"BAD Unknown command\r\n"
        searching = name == b"SEARCH" or sub == b"SEARCH"
        if "no_esearch" in q and searching and b"RETURN" in (w.upper() for w in words):
            return COURIER_BAD
        if name == b"UID" and sub in (b"SEARCH", b"FETCH", b"STORE", b"COPY", b"MOVE", b"EXPUNGE"):
            for word in words[3:]:
                if _SET_RE.match(word) and any(part == b"0" for part in re.split(rb"[:,]", word)):
                    return COURIER_BAD
        return None

    async def _from_server(
        self, reader: asyncio.StreamReader, client: asyncio.StreamWriter, state: _State
    ) -> None:
        first = True
        try:
            while True:
                line = await reader.readline()
                if not line:
                    client.close()
                    return
                literal = _LITERAL_RE.search(line)
                out = line if literal else self._rewrite(line, state, first)
                first = False
                if out:
                    client.write(out)
                await _pass_literals(reader, client, literal)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            client.transport.abort()

    def _rewrite(self, line: bytes, state: _State, greeting: bool) -> bytes:
        """One server line as the quirky server would send it (b"" drops it)."""
        q = self.quirks
        if state.idle_tag is not None:
            if line.startswith(b"+"):
                state.idling = True
            elif line.startswith(state.idle_tag + b" "):
                state.idle_tag, state.idling = None, False
            elif state.idling and "silent_idle" in q and _UNTAGGED_RE.match(line):
                return b""
        if "no_uidnext" in q and _UIDNEXT_LINE_RE.match(line):
            return b""
        if "no_status_uidnext" in q and line.upper().startswith(b"* STATUS "):
            line = _STATUS_UIDNEXT_RE.sub(b" ", line).replace(b"( ", b"(").replace(b" )", b")")
        if "no_uidplus" in q:
            line = _UIDPLUS_CODE_RE.sub(b"", line)
        m = _CAPS_LINE_RE.match(line)
        if m:
            line = m.group(1) + self._caps(m.group(2)) + m.group(3)
        line = _CAPS_CODE_RE.sub(lambda c: b"[CAPABILITY " + self._caps(c.group(1)) + b"]", line)
        if "gmail" in q:
            line = self._gmail_list(line)
        if greeting and self.greeting is not None:
            head, sep, _ = line.partition(b"] ")
            line = (head + sep if sep else b"* OK ") + self.greeting.encode() + b"\r\n"
        return line

    def _caps(self, caps: bytes) -> bytes:
        drop = {b"STARTTLS", b"LOGINDISABLED"}
        q = self.quirks
        if "no_move" in q:
            drop.add(b"MOVE")
        if "no_uidplus" in q:
            drop.add(b"UIDPLUS")
        if "no_esearch" in q:
            drop |= {b"ESEARCH", b"ESORT", b"SEARCHRES"}
        kept = [c for c in caps.split() if c.upper() not in drop]
        if "gmail" in q:
            kept.append(b"X-GM-EXT-1")
        return b" ".join(kept)

    @staticmethod
    def _gmail_list(line: bytes) -> bytes:
        m = _LIST_RE.match(line.rstrip(b"\r\n"))
        if not m:
            return line
        flags = [f for f in m.group(2).split() if f.lower() != b"\\sent"]
        if GMAIL_SENT.encode() in m.group(3):
            flags.append(b"\\Sent")
        return m.group(1) + b" ".join(flags) + m.group(3) + b"\r\n"


async def _pass_literals(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, literal: re.Match[bytes] | None
) -> None:
    """Forward the literal a line announced, and the rest of that command or response
    (which may announce another), untouched; then flush."""
    while literal:
        writer.write(await reader.readexactly(int(literal.group(1))))
        line = await reader.readline()
        writer.write(line)
        literal = _LITERAL_RE.search(line)
    await writer.drain()
