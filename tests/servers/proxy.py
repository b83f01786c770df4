"""A TCP proxy on loopback that can silently stop forwarding ("dead NAT path").

:class:`TcpProxy` listens on a free loopback port and forwards every accepted
connection to ``(target_host, target_port)``. It runs its own event loop in a
background thread, so tests on any loop (or synchronous tests) can use it.

* :meth:`TcpProxy.freeze` stops moving bytes in both directions but keeps every
  socket open: peers see no FIN/RST, their reads simply never return - what a
  client sees when a NAT mapping or a Wi-Fi path dies. New connections are
  still accepted while frozen (their bytes wait too).
* :meth:`TcpProxy.thaw` resumes; bytes held back while frozen are delivered.
* :meth:`TcpProxy.cut` aborts all current connections (both sides get a reset).

TLS passes through untouched (it is just bytes), so clients connect to
``proxy.host:proxy.port`` and still verify the real server's certificate.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from .loop_thread import LoopThread

_CHUNK = 64 * 1024


class TcpProxy:
    """See the module docstring. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self._ssl = ssl  # a TLS listener (clients see TLS, the target plaintext)
        self._cond = threading.Condition()
        self._accepted = 0
        self._active = 0
        self._runner = LoopThread("tcp-proxy")
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._frozen = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> TcpProxy:
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
        """Start the loop thread and the listener; return once it accepts."""
        self._runner.start(self._start, timeout, self._shutdown)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every connection, and stop the loop thread."""
        self._runner.stop(self._shutdown)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
        self._runner.call(coro, timeout)

    # ------------------------------------------------------------------ controls

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients should connect to."""
        return self.host, self.port

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return self._frozen

    def freeze(self) -> None:
        """Stop forwarding in both directions, keeping all sockets open.

        When this returns, no further byte is forwarded until :meth:`thaw`.
        """
        self._call(self._set_flowing(False))

    def thaw(self) -> None:
        """Resume forwarding (bytes held back while frozen are delivered)."""
        self._call(self._set_flowing(True))

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        self._frozen = not flowing
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def cut(self) -> None:
        """Abort every current connection (client and server side). The listener
        keeps accepting new ones."""

        async def cut() -> None:
            self._abort_all()

        self._call(cut())

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    @property
    def connections_accepted(self) -> int:
        """How many client connections were accepted so far."""
        with self._cond:
            return self._accepted

    @property
    def active_connections(self) -> int:
        """How many client connections are currently open through the proxy."""
        with self._cond:
            return self._active

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> int:
        """Block until at least ``count`` connections were accepted in total.

        Returns the total; raises ``TimeoutError`` after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._accepted >= count, timeout):
                raise TimeoutError(
                    f"proxy accepted {self._accepted} connection(s), wanted {count} "
                    f"within {timeout}s"
                )
            return self._accepted

    async def await_connections(self, count: int, timeout: float = 10.0) -> int:
        """:meth:`wait_for_connections` for async tests."""
        return await asyncio.to_thread(self.wait_for_connections, count, timeout)

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._cond:
            self._accepted += 1
            self._active += 1
            self._cond.notify_all()
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_r, upstream_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                client_w.transport.abort()
                return
            self._writers.add(upstream_w)
            await self._relay(client_r, client_w, upstream_r, upstream_w)
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
            self._tasks.discard(task)

    async def _relay(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> None:
        """Move bytes both ways until either side ends (subclasses rewrite them)."""
        await asyncio.gather(
            self._pump(client_r, upstream_w),
            self._pump(upstream_r, client_w),
            return_exceptions=True,
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                # Re-check after the read: freeze() may have happened meanwhile.
                # Event.wait() returns without yielding when set, so nothing can run
                # between this check and the write below.
                await self._flowing.wait()
                if not data:
                    # Half-close: pass the EOF on, keep the other direction open.
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            # One side died: tear the pair down like a real path would.
            writer.transport.abort()
