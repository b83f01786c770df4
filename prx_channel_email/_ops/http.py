"""A tiny HTTP/1.1 server on the event loop for the operations endpoint.

Only ``GET`` (and ``HEAD``) of a few fixed paths, one request per connection.
It runs on the channel's own event loop: no thread, nothing per request beyond
one task. Everything is bounded so that a slow or hostile client costs little:
the request head (``MAX_HEAD_BYTES``), the time to send it
(``READ_TIMEOUT_SECS``), the time to take the answer (``WRITE_TIMEOUT_SECS``)
and the number of connections served at once (``MAX_CONNECTIONS``; more are
answered 503 at once and closed). A request body is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prx_channel_email._support.observability import log_event

log = logging.getLogger("prx_channel_email.ops")

MAX_HEAD_BYTES = 8 * 1024
READ_TIMEOUT_SECS = 10.0
WRITE_TIMEOUT_SECS = 10.0
MAX_CONNECTIONS = 32
LINGER_SECS = 1.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[], Awaitable[Response]]


class HttpServer:
    """Serves ``routes`` (path -> async handler) on ``host:port`` until :meth:`close`."""

    def __init__(self, routes: dict[str, Route], *, name: str = "ops") -> None:
        self.routes = routes
        self.name = name
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful after asking for port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=MAX_HEAD_BYTES
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.wait(set(self._active), timeout=WRITE_TIMEOUT_SECS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), WRITE_TIMEOUT_SECS)
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        busy = len(self._active) >= MAX_CONNECTIONS
        if task is not None:
            self._active.add(task)
        try:
            if busy:
                response, head, unread = Response(503, b"too many connections\n"), False, True
            else:
                response, head = await self._answer(reader)
                unread = response.status in (408, 431)
            await self._write(writer, response, head_only=head)
            if unread:
                await _linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or would not take the answer: nothing to tell it
        except asyncio.CancelledError:
            pass  # close(): this task is the top of its own connection, so the cancel ends here
        finally:
            if task is not None:
                self._active.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT_SECS)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECS):
                raw = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return Response(408, b"request timeout\n"), False
        except asyncio.LimitOverrunError:
            return Response(431, b"request head too large\n"), False
        except asyncio.IncompleteReadError:
            raise ConnectionResetError from None
        request_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return Response(400, b"bad request\n"), False
        method, target, _version = parts
        path = target.split("?", 1)[0]
        route = self.routes.get(path)
        if route is None:
            return Response(404, b"not found\n"), False
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers={"Allow": "GET, HEAD"}), False
        try:
            return await route(), method == "HEAD"
        except Exception as exc:  # a bug in a view must not take the endpoint down
            log_event(log, logging.ERROR, "ops.request_failed", exc=exc, path=path,
                      code="internal_error")  # fmt: skip
            return Response(500, b"internal error\n"), False

    async def _write(self, writer: asyncio.StreamWriter, response: Response, *,
                     head_only: bool) -> None:  # fmt: skip
        reason = _REASONS.get(response.status, "")
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{k}: {v}" for k, v in response.headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        async with asyncio.timeout(WRITE_TIMEOUT_SECS):
            await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answered without reading the whole request: say we are done (FIN), then read
    what the client still sends, briefly. Closing with unread bytes would send a
    reset, and the client could lose the answer it has not read yet."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(LINGER_SECS):
            while await reader.read(MAX_HEAD_BYTES):
                pass
