"""A private asyncio loop in a daemon thread.

The fixture servers (SMTP, TCP proxy) live on their own loop so that tests on any
loop, or synchronous tests, can use them, and a blocked test loop cannot stall them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(
        self,
        setup: Callable[[], Coroutine[Any, Any, None]],
        timeout: float,
        shutdown: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        """Start the thread and run ``setup()`` on its loop; on failure shut down again."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        self._thread.start()
        try:
            self.call(setup(), timeout)
        except BaseException:
            self.stop(shutdown)
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the thread's loop and wait (bounded) for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, shutdown: Callable[[], Coroutine[Any, Any, None]] | None) -> None:
        """Run ``shutdown()`` (errors ignored), then stop and close the loop."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if shutdown is not None:
            with contextlib.suppress(Exception):
                self.call(shutdown(), 10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None
