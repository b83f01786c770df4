"""The one module that knows aioimaplib's internals.

aioimaplib does the IMAP wire protocol, but a long-running listener needs a few
things it does not offer as API: a parser loop without recursion, an incremental
"FETCH complete?" check, seeing ``EXISTS``/``BYE`` as they arrive, the IDLE
continuation, the bytes left unread after STARTTLS, SASL ``AUTHENTICATE``. All of
that reaches into private attributes (``_handle_responses``, ``_resp_lines``,
``_idle_event``, ``idle_queue``, ``incomplete_line``, ...), which any release may
change. Keeping every such access here means an upgrade is checked in one place:

* :data:`TESTED_RANGE` is the range ``tests/test_imap_compat.py`` was run against;
  an installed version outside it logs a warning once, at import;
* :func:`contract_problems` checks that every internal we use still exists;
  :func:`ensure_compatible` (called before each connection) turns a broken
  contract into a ChannelError with code ``imap_library_incompatible`` instead of
  an AttributeError deep in a parser callback.

Nothing outside this module imports aioimaplib.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, cast

from aioimaplib import aioimaplib as _aio

from prx_channel_email.errors import ChannelError

log = logging.getLogger("prx_channel_email.imap")

# [lowest tested, first untested): widen it only after tests/test_imap_compat.py passes.
TESTED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 0, 0), (2, 1, 0))

#: Every exception aioimaplib raises on its own (protocol errors, aborts, timeouts).
ImapLibError = _aio.AioImapException

_CRLF = b"\r\n"
_LITERAL_RE = re.compile(rb".*\{(?P<size>\d+)\}$")
_EXISTS_RE = re.compile(rb"^\* \d+ EXISTS\b", re.IGNORECASE)
_BYE_RE = re.compile(rb"^\* BYE\b", re.IGNORECASE)

# What this module uses of aioimaplib, checked by contract_problems().
_MODULE_NAMES = (
    "IMAP4ClientProtocol",
    "Command",
    "FetchCommand",
    "IncompleteRead",
    "AioImapException",
    "Commands",
    "quoted",
    "log",
    "CONNECTED",
    "NONAUTH",
    "AUTH",
    "SELECTED",
    "LOGOUT",
)
_PROTOCOL_METHODS = (
    "_handle_line",
    "_handle_responses",
    "_continuation",
    "data_received",
    "execute",
    "new_tag",
    "wait",
    "login",
    "logout",
    "append",
    "idle",
    "idle_done",
    "wait_for_idle_response",
)
_PROTOCOL_ATTRIBUTES = (
    "transport",
    "state",
    "state_condition",
    "capabilities",
    "pending_sync_command",
    "idle_queue",
    "_idle_event",
    "incomplete_line",
    "current_command",
)
_COMMAND_METHODS = (
    "wait_data",
    "wait_literal_data",
    "begin_literal_data",
    "append_literal_data",
    "flush",
)
# The commands we send, and whether aioimaplib must run them one at a time.
_COMMANDS_USED = {
    "APPEND": "is_sync",
    "AUTHENTICATE": "is_sync",
    "CAPABILITY": "is_async",
    "COPY": "is_async",
    "EXPUNGE": "is_async",
    "FETCH": "is_async",
    "ID": "is_async",
    "IDLE": "is_sync",
    "LIST": "is_async",
    "LOGIN": "is_sync",
    "LOGOUT": "is_sync",
    "MOVE": "is_sync",
    "NOOP": "is_async",
    "SEARCH": "is_async",
    "SELECT": "is_sync",
    "STARTTLS": "is_sync",
    "STORE": "is_async",
}


def installed_version() -> tuple[int, ...]:
    """aioimaplib's version as numbers (``(2, 0, 3)``); ``()`` when unknown."""
    try:
        text = metadata.version("aioimaplib")
    except metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def version_in_tested_range(version: tuple[int, ...] | None = None) -> bool:
    version = installed_version() if version is None else version
    low, high = TESTED_RANGE
    return bool(version) and low <= version < high


def contract_problems() -> list[str]:
    """Each internal of aioimaplib this module relies on that is missing or changed."""
    problems = [f"aioimaplib.{n} is gone" for n in _MODULE_NAMES if not hasattr(_aio, n)]
    if problems:
        return problems
    proto_cls = _aio.IMAP4ClientProtocol
    problems += [
        f"IMAP4ClientProtocol.{n} is gone" for n in _PROTOCOL_METHODS if not hasattr(proto_cls, n)
    ]
    params = list(inspect.signature(proto_cls.__init__).parameters)
    if params[:3] != ["self", "loop", "conn_lost_cb"]:
        problems.append(f"IMAP4ClientProtocol(loop, conn_lost_cb) changed to {params[1:]}")
    if "_handle_responses" in vars(proto_cls):
        params = list(inspect.signature(proto_cls._handle_responses).parameters)
        if params[:4] != ["self", "data", "line_handler", "current_cmd"]:
            problems.append(f"_handle_responses(data, line_handler, current_cmd) is {params[1:]}")
    problems += [f"Command.{n} is gone" for n in _COMMAND_METHODS if not hasattr(_aio.Command, n)]
    if not hasattr(_aio.FetchCommand, "FETCH_MESSAGE_DATA_RE"):
        problems.append("FetchCommand.FETCH_MESSAGE_DATA_RE is gone")
    for name, kind in _COMMANDS_USED.items():
        spec = _aio.Commands.get(name)
        if spec is None or getattr(spec.exec, "name", None) != kind:
            problems.append(f"command {name} is no longer known as {kind}")
    return problems


def instance_problems(proto: Any) -> list[str]:
    """Attributes a fresh protocol must carry (set in aioimaplib's ``__init__``)."""
    problems = [
        f"IMAP4ClientProtocol().{n} is gone" for n in _PROTOCOL_ATTRIBUTES if not hasattr(proto, n)
    ]
    cmd = _aio.Command("NOOP", "t0", loop=proto.loop)
    if not isinstance(getattr(cmd, "_resp_lines", None), list):
        problems.append("Command()._resp_lines is no longer a list")
    return problems


_PROBLEMS: list[str] | None = None  # checked once, at the first connection
_VERSION_CHECKED = False


def _warn_untested_version() -> None:
    global _VERSION_CHECKED
    if _VERSION_CHECKED:
        return
    _VERSION_CHECKED = True
    version = installed_version()
    if not version_in_tested_range(version):
        low, high = TESTED_RANGE
        text = (
            f"aioimaplib {'.'.join(map(str, version)) or '(unknown)'} is outside the range"
            f" prx-channel-email was tested with (>={'.'.join(map(str, low))},"
            f" <{'.'.join(map(str, high))}); run tests/test_imap_compat.py against it"
        )
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        log.warning(text)


def ensure_compatible() -> None:
    """Raise a clear ChannelError when the installed aioimaplib breaks the contract."""
    global _PROBLEMS
    _warn_untested_version()
    if _PROBLEMS is None:
        _PROBLEMS = contract_problems()
    if _PROBLEMS:
        raise ChannelError(
            "the installed aioimaplib is not compatible with prx-channel-email: "
            + "; ".join(_PROBLEMS),
            code="imap_library_incompatible",
        )


def _no_login_lines(record: logging.LogRecord) -> bool:
    """aioimaplib's debug log masks the password only verbatim, not once quoted and
    escaped, and not at all in AUTHENTICATE; drop its record of those lines."""
    text = str(record.msg)
    return " LOGIN " not in text and " AUTHENTICATE " not in text


_aio.log.addFilter(_no_login_lines)


def quote(value: str) -> str:
    """An IMAP quoted string (RFC 3501 section 9); aioimaplib only applies it to passwords."""
    return str(_aio.quoted(value))


class ImapResponse(Protocol):
    """A command's answer: ``result`` ("OK", "NO", "BAD") and the response lines
    (untagged lines without the ``* ``, literals as bytearrays, the tagged text last)."""

    @property
    def result(self) -> str: ...

    @property
    def lines(self) -> list[Any]: ...


@dataclass
class SaslExchange:
    """An AUTHENTICATE in progress: what we still have to send and what the server said."""

    responses: list[str]
    abort_reply: str
    challenges: list[str] = field(default_factory=list)


class ImapProtocol(_aio.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol with a loop instead of recursion, BYE/EXISTS tracking,
    and small named methods for the internals ``imap.py`` needs."""

    transport: Any  # aioimaplib's; None until connected

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, self._lost)
        problems = instance_problems(self)
        if problems:
            raise ChannelError(
                "the installed aioimaplib is not compatible: " + "; ".join(problems),
                code="imap_library_incompatible",
            )
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.greeting = ""
        self.bye: str | None = None
        self._sasl: SaslExchange | None = None
        self.bytes_received = 0  # what the server sent on this connection (the tools count it)

    def data_received(self, d: bytes) -> None:
        self.bytes_received += len(d)
        super().data_received(d)

    def _lost(self, exc: BaseException | None) -> None:
        self.closed.set()

    # --- what imap.py asks of the connection ---

    @property
    def capability_set(self) -> frozenset[str]:
        return frozenset(str(c).upper() for c in self.capabilities)

    def set_capabilities(self, caps: set[str]) -> None:
        self.capabilities = caps

    async def wait_greeting(self) -> None:
        """Until the server's greeting moved the state past CONNECTED."""
        await self.wait("AUTH|NONAUTH")

    @property
    def has_unread_bytes(self) -> bool:
        """Bytes received but not yet parsed (after STARTTLS: a possible injection)."""
        return bool(self.incomplete_line)

    def use_transport(self, transport: asyncio.Transport) -> None:
        """Go on over a new transport (the TLS one after STARTTLS)."""
        self.transport = transport

    def mark_selected(self) -> None:
        """A raw SELECT succeeded: let aioimaplib accept SELECTED-state commands."""
        self.state = _aio.SELECTED

    def command(self, name: str, *args: str) -> Awaitable[ImapResponse]:
        """Send ``name`` (``"UID FETCH"``, ``"SELECT"``...) with ``args``; await its answer.

        Raises ValueError (before sending) for CR, LF or NUL in an argument.
        """
        tag = self.new_tag()
        if name == "FETCH" or name.startswith("UID FETCH"):
            cmd: Any = _FetchCommand(tag, *args, prefix="UID" if name.startswith("UID") else None)
        else:
            prefix, _, base = name.rpartition(" ")
            cmd = _aio.Command(
                base,
                tag,
                *args,
                prefix=prefix or None,
                untagged_resp_name="FETCH" if base == "STORE" else None,
            )
        return cast(Awaitable[ImapResponse], self.execute(cmd))

    # --- IDLE ---

    def start_idle(self) -> asyncio.Future[ImapResponse]:
        """Send IDLE; the future completes with IDLE's tagged answer (after DONE)."""
        self._idle_event.clear()
        return cast("asyncio.Future[ImapResponse]", asyncio.ensure_future(self.idle()))

    async def idle_accepted(self) -> None:
        """Until the server's ``+`` continuation for IDLE."""
        await self.wait_for_idle_response()

    def send_idle_done(self) -> None:
        self.idle_done()

    def drop_idle_pushes(self) -> None:
        """aioimaplib keeps its own copy of pushes during IDLE; we use ``changed``."""
        while not self.idle_queue.empty():
            self.idle_queue.get_nowait()

    # --- SASL ---

    async def authenticate(
        self,
        mechanism: str,
        initial_response: str,
        *,
        sasl_ir: bool,
        abort_reply: str = "",
    ) -> tuple[ImapResponse, list[str]]:
        """``AUTHENTICATE mechanism`` with a base64 initial response (RFC 3501 6.2.2).

        With ``sasl_ir`` (RFC 4959) the response goes on the command line; else it
        answers the first ``+``. Any further ``+`` is an error challenge (XOAUTH2,
        OAUTHBEARER): it is recorded and answered with ``abort_reply`` so the server
        sends its tagged NO. Returns the answer and the challenges (base64 text).
        """
        exchange = SaslExchange(
            responses=[] if sasl_ir else [initial_response], abort_reply=abort_reply
        )
        args = (mechanism, initial_response) if sasl_ir else (mechanism,)
        cmd = _aio.Command("AUTHENTICATE", self.new_tag(), *args, loop=self.loop)
        self._sasl = exchange
        try:
            async with self.state_condition:
                resp = cast(ImapResponse, await self.execute(cmd, scrub=initial_response))
                if resp.result == "OK":
                    self.state = _aio.AUTH
                self.state_condition.notify_all()
        finally:
            self._sasl = None
        return resp, exchange.challenges

    def _continuation(self, line: bytes) -> Any:
        pending = self.pending_sync_command
        if self._sasl is not None and pending is not None and pending.name == "AUTHENTICATE":
            exchange = self._sasl
            if exchange.responses:
                reply = exchange.responses.pop(0)
            else:
                exchange.challenges.append(line[1:].strip().decode(errors="replace"))
                reply = exchange.abort_reply
            if self.transport is not None:
                self.transport.write(reply.encode() + _CRLF)
            return None
        return super()._continuation(line)

    # --- the parser ---

    def _handle_line(self, line: bytes, current_cmd: Any) -> Any:
        if line:
            if self.state == _aio.CONNECTED and not self.greeting:
                self.greeting = line.decode(errors="replace")
            if line.startswith(b"* "):
                if _EXISTS_RE.match(line):
                    self.changed.set()
                elif _BYE_RE.match(line):
                    self.bye = line[6:].decode(errors="replace").strip()
                    if self.state not in (_aio.LOGOUT, _aio.CONNECTED):
                        self.closed.set()
        return super()._handle_line(line, current_cmd)

    def _handle_responses(
        self,
        data: bytes,
        line_handler: Callable[[bytes, Any], Any],
        current_cmd: Any = None,
    ) -> None:
        # Same state machine as aioimaplib's, as a loop: its tail recursion per line
        # raised RecursionError on FETCH responses with many messages.
        while True:
            if not data:
                if self.pending_sync_command is not None:
                    self.pending_sync_command.flush()
                if current_cmd is not None and current_cmd.wait_data():
                    raise _aio.IncompleteRead(current_cmd)
                return
            if current_cmd is not None and current_cmd.wait_literal_data():
                data = current_cmd.append_literal_data(data)
                if current_cmd.wait_literal_data():
                    raise _aio.IncompleteRead(current_cmd)
            line, separator, tail = data.partition(_CRLF)
            if not separator:
                raise _aio.IncompleteRead(current_cmd, data)
            cmd = line_handler(line, current_cmd)
            literal = _LITERAL_RE.match(line)
            if literal:
                if cmd is None:
                    cmd = _aio.Command("NIL", "unused", loop=self.loop)
                cmd.begin_literal_data(int(literal.group("size")))
                data, current_cmd = tail, cmd
            elif cmd is not None and cmd.wait_data():
                data, current_cmd = tail, cmd
            else:
                data, current_cmd = tail, None


class _FetchCommand(_aio.FetchCommand):  # type: ignore[misc]
    """aioimaplib's FETCH command, with the "response complete?" check made incremental.

    The original rescans every response line on each new line (quadratic in the
    number of messages fetched); this keeps running parenthesis counts instead.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._scanned = 0
        self._balance = 0

    def wait_data(self) -> bool:
        lines = self._resp_lines
        for line in lines[self._scanned :]:
            if isinstance(line, bytes):
                if self.FETCH_MESSAGE_DATA_RE.match(line):
                    self._balance = 0
                self._balance += line.count(b"(") - line.count(b")")
        self._scanned = len(lines)
        return bool(self._balance)
