"""One IMAP connection over aioimaplib, with every network wait bounded.

aioimaplib does the wire protocol; this module adds what it lacks or gets wrong
for a long-running listener:

* STARTTLS (it has none): the transport is upgraded in place with ``loop.start_tls``;
* a dead connection never hangs a caller: every command races the connection's
  "closed" event (a server ``BYE`` or a lost transport) and a timeout;
* its response parser recurses once per line, so a big FETCH response overflows
  the stack; the parser is replaced by an equivalent loop, and fetches are batched;
  (what touches aioimaplib's internals lives in ``_imap_compat.py``);
* it drops untagged ``EXISTS`` outside IDLE, so new mail announced during another
  command would wait for the next keepalive; here any ``EXISTS`` sets ``changed``;
* it quotes the password but not the user name or mailbox names; we quote both
  (and encode mailbox names as modified UTF-7);
* servers differ in what RFC 3501 they follow: a SELECT without ``[UIDNEXT]``
  (Courier) is answered from what the server has (:meth:`ImapSession.last_uid_at_select`),
  no UID range ever starts at 0, and folder names follow the server's personal
  namespace (:meth:`ImapSession.resolve_folder`: ``Processed`` is
  ``INBOX.Processed`` on Courier, ``INBOX/Processed`` on Cyrus).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from prx_channel_email._net import imap_compat as compat
from prx_channel_email._net.imap_compat import ImapLibError, ImapProtocol, ImapResponse, quote
from prx_channel_email._net.tls import (
    TlsSettings,
    check_plaintext_allowed,
    open_tls,
    shrink_read_buffer,
    ssl_context,
    start_tls,
)
from prx_channel_email._oauth.tokens import TokenManager, imap_login, required
from prx_channel_email._support.observability import log_event
from prx_channel_email._version import __version__
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.slices import ConfigSlice
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    FolderNotFoundError,
    TransportError,
)

T = TypeVar("T")

log = logging.getLogger("prx_channel_email.imap")

CLIENT_ID = {"name": "prx-channel-email", "version": __version__}
_LITERAL_RE = re.compile(rb".*\{(?P<size>\d+)\}$")
_FETCH_START_RE = re.compile(rb"^(\d+) FETCH \(")
# The slowest link a body download is expected to survive: 25 MB in about 400 s.
MIN_FETCH_BYTES_PER_SEC = 64 * 1024
_UID_RE = re.compile(rb"\bUID (\d+)")
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")
_LIST_RE = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>NIL|"(?:[^"\\]|\\.)*") ?(?P<name>.*)$')
# RFC 5530 codes that mean "try again later", not "wrong password".
_TRANSIENT_LOGIN = (b"[UNAVAILABLE]", b"[SERVERBUG]", b"[INUSE]", b"[LIMIT]")


_NAMESPACE_RE = re.compile(
    rb'^(?:NAMESPACE )?\(\("(?P<prefix>(?:[^"\\]|\\.)*)" (?P<delim>NIL|"(?:[^"\\]|\\.)*")'
)
_INTERNALDATE_RE = re.compile(rb'\bINTERNALDATE "([^"]+)"')


@dataclass(frozen=True)
class SelectInfo:
    uidvalidity: int
    uidnext: int  # 0: the server did not say (Courier): see last_uid_at_select
    exists: int


@dataclass(frozen=True)
class Namespace:
    """The personal namespace: where a user's folders live (RFC 2342)."""

    prefix: str  # "" (Dovecot, Gmail), "INBOX." (Courier), "INBOX/" (Cyrus)
    delimiter: str  # the hierarchy delimiter; "" for a flat server


@dataclass
class FetchedMessage:
    """One message from ``UID FETCH``: its UID, size, and the literal that was asked for."""

    uid: int
    size: int | None = None
    data: bytes | None = None
    flags: frozenset[str] | None = None  # when FLAGS was asked for


def encode_mailbox(name: str) -> str:
    """Modified UTF-7 (RFC 3501 5.1.3) for non-ASCII mailbox names."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    def sub(m: re.Match[str]) -> str:
        body = m.group(1)
        if not body:
            return "&"
        padded = body.replace(",", "/") + "=" * (-len(body) % 4)
        return base64.b64decode(padded).decode("utf-16-be")

    return re.sub(r"&([A-Za-z0-9+,]*)-", sub, name)


def uid_set(uids: list[int]) -> str:
    """Compact ``1:3,7`` form of a UID list. UID 0 names no message and is left out
    (a server may refuse the whole command for it)."""
    ordered = sorted({u for u in uids if u > 0})
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class ImapSettings(ConfigSlice):
    """What an IMAP session reads of the config (the names are EmailConfig's)."""

    account: str
    imap_host: str
    imap_port: int
    imap_security: Literal["tls", "starttls", "plain"]
    auth_method: Literal["password", "oauth2"]
    imap_login: tuple[str, str] = field(repr=False)  # (user, password); "" with OAuth
    connect_timeout_secs: float
    command_timeout_secs: float
    fetch_batch_size: int
    ca_file: Path | None
    allow_insecure: bool

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(ca_file=self.ca_file, allow_insecure=self.allow_insecure)


class ImapSession:
    """One connection to the IMAP server; see the module docstring for what it adds."""

    def __init__(
        self,
        config: ImapSettings,
        protocol: ImapProtocol,
        host: str,
        port: int,
        tokens: TokenManager | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens  # the account's OAuth tokens (None: a password login)
        self._proto = protocol
        self.host = host
        self.port = port
        self.greeting: str = protocol.greeting
        self.capabilities: frozenset[str] = frozenset()
        self._idle_task: asyncio.Future[Any] | None = None
        self._namespace: Namespace | None = None
        self._resolved: dict[str, str] = {}
        self._refresh_caps()

    # --- connection ---

    @classmethod
    async def connect(
        cls,
        settings: EmailConfig | ImapSettings,
        *,
        tokens: TokenManager | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> ImapSession:
        """TCP + TLS (implicit or STARTTLS) + greeting. Raises TransportError.
        ``tokens``: the account's token manager, which an OAuth login needs."""
        config = ImapSettings.of(settings)
        if config.auth_method == "oauth2":  # a wiring error: say so before connecting
            required(tokens, "IMAP login")
        host = host or config.imap_host
        port = port or config.imap_port
        security = config.imap_security
        if security == "plain":
            check_plaintext_allowed(config.tls, host)
        ctx = ssl_context(config.tls) if security != "plain" else None
        compat.ensure_compatible()
        loop = asyncio.get_running_loop()
        proto = ImapProtocol(loop)
        timeout = config.connect_timeout_secs
        try:
            async with asyncio.timeout(timeout):
                if security == "tls":
                    assert ctx is not None
                    await open_tls(loop, proto, host, port, ctx, handshake_timeout=timeout)
                else:
                    await loop.create_connection(lambda: proto, host, port)
                await _race(proto, proto.wait_greeting())
        except (TimeoutError, OSError, ssl.SSLError, ChannelError, ImapLibError) as exc:
            _abort(proto)
            raise _transport_error(exc, host, port, "connect") from exc
        session = cls(config, proto, host, port, tokens)
        if security == "starttls":
            try:
                await session._starttls(ctx)
            except BaseException:
                session.abort()
                raise
        return session

    async def _starttls(self, ctx: ssl.SSLContext | None) -> None:
        if "STARTTLS" not in self.capabilities:
            raise TransportError(
                f"{self.host}:{self.port} does not offer STARTTLS",
                host=self.host,
                port=self.port,
                code="starttls_unavailable",
            )
        proto = self._proto
        resp = await self._execute("STARTTLS")
        if resp.result != "OK":
            raise TransportError(
                f"STARTTLS refused by {self.host}:{self.port}: {_text(resp)}",
                host=self.host,
                port=self.port,
                code="starttls_failed",
            )
        if proto.has_unread_bytes:
            # Bytes sent before the handshake would be read as if protected by TLS.
            raise TransportError(
                f"{self.host}:{self.port} sent data right after STARTTLS (possible injection)",
                host=self.host,
                port=self.port,
                code="starttls_failed",
            )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout_secs):
                assert ctx is not None
                transport = await start_tls(
                    loop,
                    proto.transport,
                    proto,
                    ctx,
                    server_hostname=self.host,
                    handshake_timeout=self.config.connect_timeout_secs,
                )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise _transport_error(exc, self.host, self.port, "STARTTLS") from exc
        if transport is None:
            raise TransportError("STARTTLS upgrade failed", host=self.host, port=self.port)
        proto.use_transport(transport)
        # Capabilities before TLS are not to be trusted (RFC 3501 6.2.1).
        await self._capability()

    @property
    def has_idle(self) -> bool:
        return "IDLE" in self.capabilities

    @property
    def is_open(self) -> bool:
        return not self._proto.closed.is_set()

    @property
    def bytes_received(self) -> int:
        """Bytes the server sent on this connection so far (TLS records excluded)."""
        return self._proto.bytes_received

    @property
    def changed(self) -> asyncio.Event:
        """Set whenever the server announces ``EXISTS`` (clear it before a sync)."""
        return self._proto.changed

    def _refresh_caps(self) -> None:
        self.capabilities = self._proto.capability_set

    async def _capability(self) -> None:
        resp = await self._execute("CAPABILITY")
        caps: set[str] = set()
        # aioimaplib strips the response name: the untagged line is just the list.
        for line in resp.lines[:-1]:
            if isinstance(line, bytes) and b"IMAP4" in line.upper():
                caps.update(line.decode(errors="replace").split())
        if caps:
            self._proto.set_capabilities(caps)
        self._refresh_caps()

    # --- commands ---

    async def _run(self, aw: Awaitable[T], what: str, limit: float | None = None) -> T:
        """Await a command, bounded, and fail fast when the connection is gone."""
        limit = self.config.command_timeout_secs if limit is None else limit
        try:
            async with asyncio.timeout(limit):
                return await _race(self._proto, aw)
        except TimeoutError as exc:
            self.abort()
            raise TransportError(
                f"{what} got no answer from {self.host}:{self.port} within {limit:g} s",
                host=self.host,
                port=self.port,
                code="timeout",
            ) from exc
        except ValueError as exc:  # CR/LF/NUL in an argument: refused before sending
            raise ChannelError(f"{what}: {exc}", code="invalid_argument") from exc
        except (OSError, ImapLibError) as exc:
            self.abort()
            raise _transport_error(exc, self.host, self.port, what) from exc

    async def _execute(self, name: str, *args: str, limit: float | None = None) -> ImapResponse:
        return await self._run(self._proto.command(name, *args), name, limit)

    async def login(self) -> None:
        """LOGIN (or OAuth's AUTHENTICATE), then CAPABILITY and ID. Raises
        AuthenticationError on NO/BAD."""
        user, password = self.config.imap_login
        if self.config.auth_method == "oauth2":
            await imap_login(required(self.tokens, "IMAP login"), self, user)
        else:
            await self._login_password(user, password)
        await self._capability()
        if "ID" in self.capabilities:
            # Some providers refuse clients that do not identify; the answer does not matter.
            fields = " ".join(f"{quote(k)} {quote(v)}" for k, v in CLIENT_ID.items())
            try:
                await self._execute("ID", f"({fields})")
            except TransportError:
                if not self.is_open:
                    raise

    async def sasl(
        self, mechanism: str, initial_response: str, *, abort_reply: str = ""
    ) -> tuple[bool, str, list[str]]:
        """One AUTHENTICATE exchange: (accepted, the server's text, error challenges).

        Raises TransportError when the server says to try again later.
        """
        resp, challenges = await self._run(
            self._proto.authenticate(
                mechanism,
                initial_response,
                sasl_ir="SASL-IR" in self.capabilities,
                abort_reply=abort_reply,
            ),
            "AUTHENTICATE",
        )
        text = _text(resp)
        if resp.result != "OK" and any(code in text.encode() for code in _TRANSIENT_LOGIN):
            raise TransportError(
                f"{self.host} cannot log in right now: {text}",
                host=self.host,
                port=self.port,
                code="server_unavailable",
            )
        return resp.result == "OK", text, challenges

    async def _login_password(self, user: str, password: str) -> None:
        if "LOGINDISABLED" in self.capabilities:
            raise AuthenticationError(
                f"{self.host} refuses LOGIN on this connection (LOGINDISABLED); use TLS",
                server=self.host,
                code="login_disabled",
            )
        resp = await self._run(self._proto.login(quote(user), password), "LOGIN")
        if resp.result != "OK":
            text = _text(resp)
            if any(code in text.encode() for code in _TRANSIENT_LOGIN):
                raise TransportError(
                    f"{self.host} cannot log in right now: {text}",
                    host=self.host,
                    port=self.port,
                    code="server_unavailable",
                )
            raise AuthenticationError(
                f"{self.host} refused the login for {user}: {text}", server=self.host
            )

    async def list_folders(self) -> list[str]:
        return [name for name, _ in await self._list()]

    async def _list(self) -> list[tuple[str, set[str]]]:
        resp = await self._execute("LIST", '""', '"*"')
        if resp.result != "OK":
            raise ChannelError(f"LIST failed: {_text(resp)}", code="list_failed")
        out: list[tuple[str, set[str]]] = []
        lines = resp.lines
        for i, line in enumerate(lines[:-1]):
            m = _LIST_RE.match(line) if isinstance(line, bytes) else None
            if not m:
                continue
            raw = m.group("name")
            literal = _LITERAL_RE.match(raw)
            if literal and i + 1 < len(lines) and not isinstance(lines[i + 1], bytes):
                name = bytes(lines[i + 1]).decode(errors="replace")
            elif raw.startswith(b'"'):
                name = re.sub(r"\\(.)", r"\1", raw[1:-1].decode(errors="replace"))
            else:
                name = raw.decode(errors="replace")
            flags = {f.lower() for f in m.group("flags").decode(errors="replace").split()}
            out.append((decode_mailbox(name), flags))
        return out

    async def find_special_use(self, flag: str) -> str | None:
        """The folder with a special-use attribute such as ``\\Sent`` (RFC 6154), if any."""
        wanted = flag.lower()
        for name, flags in await self._list():
            if wanted in flags:
                return name
        return None

    async def select(self, folder: str) -> SelectInfo:
        resp = await self._execute("SELECT", quote(encode_mailbox(folder)))
        if resp.result != "OK":
            folders = await self.list_folders()
            if folder not in folders and not (
                folder.upper() == "INBOX" and any(f.upper() == "INBOX" for f in folders)
            ):
                raise FolderNotFoundError(folder, folders)
            raise ChannelError(f"SELECT {folder!r} failed: {_text(resp)}", code="select_failed")
        self._proto.mark_selected()
        self._proto.changed.clear()  # the EXISTS of the SELECT answer is not news
        joined = b"\n".join(x for x in resp.lines if isinstance(x, bytes))
        return SelectInfo(
            uidvalidity=_int(rb"\[UIDVALIDITY (\d+)\]", joined),
            uidnext=_int(rb"\[UIDNEXT (\d+)\]", joined),
            exists=_int(rb"(?m)^(\d+) EXISTS", joined),
        )

    async def last_uid_at_select(self, folder: str, info: SelectInfo) -> int:
        """The highest UID the folder had when ``info`` was selected (0: it was empty).

        From SELECT's ``[UIDNEXT]`` when given (RFC 3501 requires it, Courier omits
        it); else from what the server really has: nothing when SELECT counted no
        messages, else the UID of the last one it counted (``FETCH n (UID)``, so mail
        that arrived since stays above), else ``STATUS (UIDNEXT)``, else the highest
        UID now. Never -1: that baseline made the next search ``UID 0:*``, which
        strict servers refuse.
        """
        if info.uidnext > 0:
            return info.uidnext - 1
        if info.exists == 0:
            return 0
        resp = await self._execute("FETCH", str(info.exists), "(UID)")
        if resp.result == "OK":
            fetched = _parse_fetch(resp.lines)
            if fetched:
                return max(fetched)
        resp = await self._execute("STATUS", quote(encode_mailbox(folder)), "(UIDNEXT)")
        if resp.result == "OK":
            joined = b" ".join(x for x in resp.lines if isinstance(x, bytes))
            found = _int(rb"\bUIDNEXT (\d+)", joined)
            if found > 0:
                return found - 1
        return await self.highest_uid()

    async def highest_uid(self) -> int:
        """The highest UID in the selected folder; 0 when it is empty."""
        resp = await self._execute("UID FETCH", "*", "(UID)")
        if resp.result == "OK":
            fetched = _parse_fetch(resp.lines)
            if fetched:
                return max(fetched)
        # No answer to "*" (an empty folder, or a server that will not say): count.
        return max(await self.uid_search("ALL"), default=0)

    async def uids_above(self, last_uid: int) -> list[int]:
        """UIDs greater than ``last_uid``, ascending. The range starts at 1 at least:
        ``n:*`` also lists the highest message when n is above it, so the answer is
        filtered too."""
        first = max(last_uid, 0) + 1
        return [u for u in await self.uid_search("UID", f"{first}:*") if u > last_uid]

    async def internal_dates(self, uids: list[int]) -> dict[int, float]:
        """When each message reached the server (INTERNALDATE, Unix time)."""
        out: dict[int, float] = {}
        for batch in _chunks(uids, 500):
            resp = await self._execute("UID FETCH", uid_set(batch), "(UID INTERNALDATE)")
            if resp.result != "OK":
                raise ChannelError(f"UID FETCH failed: {_text(resp)}", code="fetch_failed")
            for line in resp.lines:
                if not isinstance(line, bytes):
                    continue
                uid, date = _UID_RE.search(line), _INTERNALDATE_RE.search(line)
                if uid and date:
                    stamp = _internaldate(date.group(1).decode(errors="replace"))
                    if stamp is not None:
                        out[int(uid.group(1))] = stamp
        return out

    # --- folder names by the server's rules ---

    async def namespace(self) -> Namespace:
        """The personal namespace (NAMESPACE, else the delimiter from ``LIST "" ""``)."""
        if self._namespace is not None:
            return self._namespace
        prefix, delim = "", "/"
        if "NAMESPACE" in self.capabilities:
            resp = await self._execute("NAMESPACE")
            for line in resp.lines[:-1] if resp.result == "OK" else []:
                m = _NAMESPACE_RE.match(line) if isinstance(line, bytes) else None
                if m:
                    prefix = _unquote(m.group("prefix"))
                    delim = _unquote(m.group("delim"))
                    break
        else:
            resp = await self._execute("LIST", '""', '""')
            for line in resp.lines[:-1] if resp.result == "OK" else []:
                m = _LIST_RE.match(line) if isinstance(line, bytes) else None
                if m:
                    delim = _unquote(m.group("delim"))
                    break
        self._namespace = Namespace(decode_mailbox(prefix), delim)
        return self._namespace

    async def folder_exists(self, name: str) -> bool:
        resp = await self._execute("LIST", '""', quote(encode_mailbox(name)))
        if resp.result != "OK":
            return False
        return any(isinstance(line, bytes) and _LIST_RE.match(line) for line in resp.lines[:-1])

    async def resolve_folder(self, name: str) -> str:
        """The server's name for a configured folder name.

        ``name`` as written when it exists; else written with the server's
        delimiter (``INBOX/Processed`` on a ``.`` server) and under the personal
        namespace prefix (a bare ``Processed`` is ``INBOX.Processed`` on Courier,
        ``INBOX/Processed`` on Cyrus). When none exists, the name the server's rules
        give (so an error names the folder the server would need).
        """
        if name.upper() == "INBOX":
            return "INBOX"
        if name in self._resolved:
            return self._resolved[name]
        candidates = folder_candidates(name, await self.namespace())
        chosen = candidates[-1]
        for candidate in candidates:
            if await self.folder_exists(candidate):
                chosen = candidate
                break
        if chosen != name:
            log_event(log, logging.INFO, "imap.folder_resolved", folder=name,
                      resolved=chosen, host=self.host)  # fmt: skip
        self._resolved[name] = chosen
        return chosen

    async def noop(self, limit: float | None = None) -> None:
        resp = await self._execute("NOOP", limit=limit)
        if resp.result != "OK":
            raise TransportError(f"NOOP failed: {_text(resp)}", host=self.host, port=self.port)

    async def uid_search(self, *criteria: str) -> list[int]:
        resp = await self._execute("UID SEARCH", *criteria)
        if resp.result != "OK":
            raise ChannelError(f"UID SEARCH failed: {_text(resp)}", code="search_failed")
        uids: list[int] = []
        for line in resp.lines[:-1]:  # untagged "SEARCH" lines, name stripped by aioimaplib
            if isinstance(line, bytes):
                uids.extend(int(tok) for tok in line.split() if tok.isdigit())
        return sorted(uids)

    async def uid_fetch(
        self, uids: list[int], items: str, *, limit: float | None = None
    ) -> dict[int, FetchedMessage]:
        """``UID FETCH`` one batch; the caller keeps batches small (see fetch_batch_size)."""
        if not uids:
            return {}
        resp = await self._execute("UID FETCH", uid_set(uids), items, limit=limit)
        if resp.result != "OK":
            raise ChannelError(f"UID FETCH failed: {_text(resp)}", code="fetch_failed")
        return _parse_fetch(resp.lines)

    async def fetch_meta(self, uids: list[int]) -> dict[int, FetchedMessage]:
        """Size, Message-ID and From of each message, without downloading bodies."""
        out: dict[int, FetchedMessage] = {}
        # Small responses: bigger batches than for bodies mean fewer round trips.
        for batch in _chunks(uids, max(self.config.fetch_batch_size, 250)):
            items = "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID FROM)])"
            out.update(await self.uid_fetch(batch, items))
        return out

    async def fetch_headers(self, uids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for batch in _chunks(uids, self.config.fetch_batch_size):
            for uid, msg in (await self.uid_fetch(batch, "(UID BODY.PEEK[HEADER])")).items():
                if msg.data is not None:  # no data is "missing", never an empty message
                    out[uid] = msg.data
        return out

    async def fetch_bodies(self, uids: list[int], total_bytes: int = 0) -> dict[int, bytes]:
        """Whole messages with ``BODY.PEEK[]`` (never sets ``\\Seen``), one batch.

        The deadline grows with the bytes expected, so a big message on a slow link
        is not cut off (and fetched again, forever) by a fixed command timeout.
        """
        limit = (
            self.config.command_timeout_secs * (1 + len(uids) // 10)
            + total_bytes / MIN_FETCH_BYTES_PER_SEC
        )
        fetched = await self.uid_fetch(uids, "(UID BODY.PEEK[])", limit=limit)
        return {uid: msg.data for uid, msg in fetched.items() if msg.data is not None}

    async def store_flags(self, uids: list[int], flags: str = "(\\Seen)") -> None:
        resp = await self._execute("UID STORE", uid_set(uids), "+FLAGS.SILENT", flags)
        if resp.result != "OK":
            raise ChannelError(f"UID STORE failed: {_text(resp)}", code="store_failed")

    async def move(self, uids: list[int], folder: str) -> None:
        """MOVE when offered; else COPY + ``\\Deleted`` + ``UID EXPUNGE`` (needs UIDPLUS)."""
        target = quote(encode_mailbox(folder))
        if "MOVE" in self.capabilities:
            resp = await self._execute("UID MOVE", uid_set(uids), target)
            if resp.result != "OK":
                raise ChannelError(f"UID MOVE failed: {_text(resp)}", code="move_failed")
            return
        if "UIDPLUS" not in self.capabilities:
            raise ChannelError(
                "the server offers neither MOVE nor UIDPLUS: cannot move mail safely",
                code="move_unsupported",
            )
        resp = await self._execute("UID COPY", uid_set(uids), target)
        if resp.result != "OK":
            raise ChannelError(f"UID COPY failed: {_text(resp)}", code="move_failed")
        await self.store_flags(uids, "(\\Deleted)")
        await self.uid_expunge(uids, code="move_failed")

    async def uid_expunge(self, uids: list[int], *, code: str = "expunge_failed") -> None:
        """Expunge exactly ``uids`` (UIDPLUS): a plain EXPUNGE would also remove any
        other message flagged ``\\Deleted``."""
        resp = await self._execute("UID EXPUNGE", uid_set(uids))
        if resp.result != "OK":
            raise ChannelError(f"UID EXPUNGE failed: {_text(resp)}", code=code)

    async def append(self, folder: str, raw: bytes, flags: tuple[str, ...] = ("\\Seen",)) -> None:
        proto = self._proto
        resp = await self._run(
            proto.append(
                raw,
                mailbox=quote(encode_mailbox(folder)),
                flags="(" + " ".join(flags) + ")" if flags else None,
            ),
            "APPEND",
        )
        if resp.result != "OK":
            raise ChannelError(f"APPEND to {folder!r} failed: {_text(resp)}", code="append_failed")

    # --- IDLE ---

    async def idle_start(self) -> None:
        """Send IDLE and wait for the server's continuation."""
        proto = self._proto
        task = proto.start_idle()
        self._idle_task = task
        ack: asyncio.Future[Any] = asyncio.ensure_future(proto.idle_accepted())
        waiters: set[asyncio.Future[Any]] = {task, ack}
        try:
            await self._run(asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED), "IDLE")
        finally:
            ack.cancel()
        if task.done():
            self._idle_task = None
            exc = task.exception()
            detail = str(exc) if exc else _text(task.result())
            raise ChannelError(f"IDLE refused: {detail}", code="idle_failed")
        # Waiting for a push may last 29 minutes: the big read buffer of a FETCH can go.
        shrink_read_buffer(proto.transport)

    async def idle_wait(self, limit: float) -> bool:
        """Wait up to ``limit`` s for EXISTS; True if mail arrived. Raises if the link died."""
        proto = self._proto
        try:
            async with asyncio.timeout(limit):
                await _race(proto, proto.changed.wait())
        except TimeoutError:
            return False
        except (OSError, ImapLibError) as exc:
            raise _transport_error(exc, self.host, self.port, "IDLE") from exc
        finally:
            proto.drop_idle_pushes()
        return True

    async def idle_done(self, limit: float | None = None) -> None:
        """Send DONE and wait for IDLE's tagged answer (bounded: a silent drop shows here)."""
        task, self._idle_task = self._idle_task, None
        if task is None:
            return
        if not task.done():
            if not self.is_open:
                task.cancel()
                raise _transport_error(None, self.host, self.port, "IDLE")
            self._proto.send_idle_done()
        try:
            await self._run(asyncio.shield(task), "IDLE DONE", limit)
        finally:
            if not task.done():
                task.cancel()

    # --- teardown ---

    def abort(self) -> None:
        """Drop the connection now, without a goodbye."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        _abort(self._proto)

    async def logout(self) -> None:
        """LOGOUT politely, bounded; never raises."""
        try:
            if self._idle_task is not None:
                await self.idle_done(min(5.0, self.config.command_timeout_secs))
            if self.is_open:
                await self._run(
                    self._proto.logout(), "LOGOUT", min(5.0, self.config.command_timeout_secs)
                )
        except (ChannelError, OSError, ImapLibError):
            pass
        except asyncio.CancelledError:
            # aioimaplib cancels its own futures when the link drops: that is not ours
            # to keep. A cancellation of this task (close(), shutdown) must go on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self.abort()

    async def __aenter__(self) -> ImapSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.logout()


async def open_session(
    settings: EmailConfig | ImapSettings, tokens: TokenManager | None = None
) -> ImapSession:
    """Connect and log in; the session is closed again if login fails. ``tokens``:
    the account's token manager, which an OAuth login needs."""
    config = ImapSettings.of(settings)
    if config.auth_method == "oauth2":
        # No usable grant: fail before connecting (a retry then costs no network).
        await required(tokens, "IMAP login").check_grant()
    session = await ImapSession.connect(config, tokens=tokens)
    try:
        await session.login()
    except BaseException:
        session.abort()
        raise
    log_event(log, logging.DEBUG, "imap.logged_in", account=config.account, host=session.host)
    return session


# --- helpers ---


async def _race(proto: ImapProtocol, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the connection closes first (aioimaplib would wait forever)."""
    task: asyncio.Future[T] = asyncio.ensure_future(aw)
    closed: asyncio.Future[Any] = asyncio.ensure_future(proto.closed.wait())
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        closed.cancel()
    if task.done():
        return task.result()
    task.cancel()
    reason = f"server said BYE: {proto.bye}" if proto.bye else "connection closed"
    raise ConnectionResetError(reason)


def _abort(proto: ImapProtocol) -> None:
    transport = proto.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
    proto.closed.set()


def _transport_error(exc: BaseException | None, host: str, port: int, what: str) -> TransportError:
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"untrusted certificate from {host}:{port}: {exc.verify_message}"
            " (set ca_file for a self-signed server)",
            host=host,
            port=port,
            code="tls_verify_failed",
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(
            f"TLS failed with {host}:{port}: {exc}", host=host, port=port, code="tls_failed"
        )
    if isinstance(exc, TimeoutError):
        return TransportError(
            f"{what}: no answer from {host}:{port} in time", host=host, port=port, code="timeout"
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"{host}:{port} refused the connection", host=host, port=port, code="refused"
        )
    detail = f": {exc}" if exc is not None and str(exc) else ""
    return TransportError(
        f"{what} with {host}:{port} failed{detail}", host=host, port=port, code="connection_lost"
    )


def _text(resp: Any) -> str:
    for line in reversed(resp.lines):
        if isinstance(line, bytes):
            return line.decode(errors="replace")
    return str(resp.result)


def push_fix(greeting: str) -> str:
    """What to change on the server so that IDLE pushes at once (by its greeting)."""
    text = greeting.lower()
    if "cyrus" in text:
        return "Cyrus: enable idled in cyrus.conf (Debian ships it commented out)"
    if "courier" in text:
        return "Courier: set IMAP_ENHANCEDIDLE=1 in the imapd config (needs FAM/gamin)"
    return (
        "the server checks for new mail on its own schedule; ask its admin to enable "
        "push for IDLE, or lower keepalive_secs"
    )


def folder_candidates(name: str, ns: Namespace) -> list[str]:
    """Names ``name`` may have on a server with namespace ``ns``, most literal first."""
    out = [name]
    delim = ns.delimiter
    native = name.replace("/", delim) if delim and delim != "/" else name
    if native not in out:
        out.append(native)
    prefix = ns.prefix
    if prefix and not native.upper().startswith(prefix.upper()):
        out.append(prefix + native)
    return out


def _unquote(raw: bytes) -> str:
    if raw.upper() == b"NIL":
        return ""
    text = raw.decode(errors="replace")
    if text.startswith('"') and text.endswith('"'):
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _internaldate(text: str) -> float | None:
    try:
        return datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        return None


def _int(pattern: bytes, data: bytes) -> int:
    m = re.search(pattern, data)
    return int(m.group(1)) if m else 0


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _parse_fetch(lines: list[Any]) -> dict[int, FetchedMessage]:
    """Turn aioimaplib's FETCH lines (text lines, then literal bytearrays) into messages."""
    out: dict[int, FetchedMessage] = {}
    text: list[bytes] = []
    literal: bytes | None = None

    def finish() -> None:
        joined = b" ".join(text)
        uid = _UID_RE.search(joined)
        if uid:
            size = _SIZE_RE.search(joined)
            flags = _FLAGS_RE.search(joined)
            key = int(uid.group(1))
            earlier = out.get(key)
            # A second, body-less answer for the same UID (an unsolicited FLAGS update
            # that carries the UID) must not replace the body we already have.
            out[key] = FetchedMessage(
                uid=key,
                size=int(size.group(1)) if size else (earlier.size if earlier else None),
                data=literal if literal is not None else (earlier.data if earlier else None),
                flags=(
                    frozenset(flags.group(1).decode(errors="replace").lower().split())
                    if flags
                    else (earlier.flags if earlier else None)
                ),
            )

    for line in lines:
        if isinstance(line, bytes):
            if _FETCH_START_RE.match(line):
                if text:
                    finish()
                text, literal = [line], None
            elif text:
                text.append(line)
        elif text:
            literal = bytes(line)
            if isinstance(line, bytearray):
                line.clear()  # the copy replaces it: one copy of a big body, not two
    if text:
        finish()
    return out
