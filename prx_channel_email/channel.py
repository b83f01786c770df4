"""EmailChannel: the adapter a framework uses. It wires the two one-way flows.

Inbound:  IMAP (sync.py) -> parse/normalize + policy (inbound.py) -> the framework's queue.
Outbound: SendMessage -> compose + outbox (outbox.py) -> SMTP.
Both share one state store (store.py) and one set of counters.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from .config import EmailConfig
from .errors import StorageError
from .inbound import InboundPipeline
from .ledger import LedgerLookup
from .models import Channel, ChannelMessage, SendMessage
from .observability import Metrics, log_event
from .outbox import Outbox
from .store import StateStore
from .sync import SyncEngine, SyncStatus

log = logging.getLogger(__name__)

# How long close() waits for a cancelled listen() to finish its last ledger write.
LISTENER_STOP_SECS = 15.0


class EmailChannel(Channel):
    """An email account as a channel: IMAP IDLE in, threaded SMTP replies out.

    Use as an async context manager, or call :meth:`start` and :meth:`close`.
    ``listen()`` and ``send()`` start it on first use.
    """

    name = "email"

    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = StateStore(config.state_dir)
        # Shared by the hand-off (which writes) and the outbox (which finds reply parents).
        self.ledger = LedgerLookup(self.store)
        self.pipeline = InboundPipeline(config, metrics=self.metrics)
        self.sync = SyncEngine(config, self.store, self.pipeline, self.metrics, lookup=self.ledger)
        self.outbox = Outbox(
            config,
            self.store,
            self.metrics,
            parents=self.ledger,
            on_reply_durable=self._reply_durable,
        )
        self._started = False
        self._start_lock = asyncio.Lock()
        self._listeners: set[asyncio.Task[object]] = set()

    async def start(self) -> EmailChannel:
        async with self._start_lock:
            if not self._started:
                await self.store.open()
                await self.outbox.start()
                self._started = True
        return self

    async def __aenter__(self) -> EmailChannel:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def listen(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        await self.start()
        task = asyncio.current_task()
        if task is not None:
            self._listeners.add(task)
        try:
            await self.sync.run(queue)
        finally:
            if task is not None:
                self._listeners.discard(task)

    async def send(self, message: SendMessage) -> None:
        await self.start()
        await self.outbox.send(message)

    async def send_message(self, message: SendMessage) -> str:
        """Like :meth:`send`, but returns the Message-ID of the sent mail."""
        await self.start()
        return await self.outbox.send(message)

    async def ack(self, message: ChannelMessage) -> None:
        """``handoff="ack"``: the host is done with ``message``; returns once that is on disk.

        It is then never handed on again (not even after a restart), and the optional
        ``mark_seen`` / ``move_to_folder`` apply to it at the end of the next sync pass.
        A reply to it (``send(message.reply(...))``) acks it too. With
        ``handoff="queue"`` a message is handled once on the queue: this does nothing.
        Raises StorageError (a ChannelError) when the state cannot be written.
        """
        await self.start()
        if self.config.handoff == "ack":
            await self.sync.ack(message.id)

    async def _reply_durable(self, parent_id: str) -> None:
        """A reply to ``parent_id`` is durably in the outbox: the parent is handled."""
        if self.config.handoff != "ack":
            return
        try:
            await self.sync.ack(parent_id)
        except StorageError as exc:  # the reply is stored; the parent stays in flight
            log_event(log, logging.WARNING, "channel.ack_failed", exc=exc,
                      account=self.config.account, message_id=parent_id,
                      code=exc.code)  # fmt: skip

    @property
    def status(self) -> SyncStatus:
        return self.sync.status

    def stats(self) -> dict[str, int]:
        """Counters: connects, reconnects by cause, IDLE cycles, fetched, delivered, skipped..."""
        return self.metrics.snapshot()

    async def health_check(self) -> bool:
        """True unless authentication failed, the state cannot be written (the hand-off
        is paused) or the outbox cannot reach its server."""
        status = self.sync.status
        return (
            self._started
            and not status.auth_failed
            and status.storage_error is None
            and self.outbox.healthy
        )

    async def close(self) -> None:
        """Stop listening (a ledger write in flight completes), stop the outbox, close the store."""
        await self._stop_listeners()
        async with self._start_lock:
            if self._started:
                self._started = False
                await self.outbox.close()
                await self.store.close()

    async def _stop_listeners(self) -> None:
        # A listen() task still running would otherwise find its store closed under it.
        others = [t for t in self._listeners if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            _done, stuck = await asyncio.wait(others, timeout=LISTENER_STOP_SECS)
            if stuck:
                log_event(log, logging.WARNING, "channel.listener_stop_timeout",
                          account=self.config.account, code="stop_timeout")  # fmt: skip
