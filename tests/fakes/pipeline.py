"""A tiny stand-in for the inbound pipeline, and helpers to run the sync engine.

``HeaderPipeline`` builds a ChannelMessage from Message-ID/From/Subject with the
stdlib parser; it lets the transport tests run while (and whether or not) the
real pipeline in ``inbound.py`` is finished. ``make_pipeline("real", ...)`` gives
the real one, or skips when it is still the stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import email.utils
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._inbound.pipeline import InboundPipeline, Outcome
from prx_channel_email._inbound.sync import SyncEngine
from prx_channel_email._mail.message_ids import normalize_id, synthetic_message_id
from prx_channel_email._storage.sqlite.store import LedgerEntry, StateStore
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.config_builder import build_config
from tests.servers.dovecot import Account, DovecotServer

SENDER = "alice@example.test"


class HeaderPipeline(InboundPipeline):
    """Delivers everything except senders listed in ``reject``; no body parsing."""

    def __init__(self, config: EmailConfig, *, reject: set[str] | None = None, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.reject = reject or set()
        self.oversized: list[tuple[bytes, int]] = []

    def _outcome(self, raw: bytes, size: int | None = None, known_id: str | None = None) -> Outcome:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        mid = known_id or normalize_id(str(msg.get("Message-ID", ""))) or synthetic_message_id(raw)
        sender = email.utils.parseaddr(str(msg.get("From", "")))[1].lower()
        if sender in self.reject:
            return Outcome("reject", mid, reason="not_allowed")
        subject = str(msg.get("Subject", ""))
        if size is not None:
            subject = f"[too large: {size} bytes] {subject}"
        cm = ChannelMessage(
            id=mid,
            sender=sender,
            reply_target=sender,
            subject=subject,
            timestamp=int(time.time()),
            thread_ts=mid,
        )
        entry = LedgerEntry(mid, sender, sender, subject, mid, [], time.time())
        return Outcome("deliver", mid, message=cm, entry=entry)

    async def process(
        self,
        raw: bytes,
        *,
        arrival: float | None = None,
        message_id: str | None = None,
        release: str | None = None,
    ) -> Outcome:
        return self._outcome(raw, known_id=message_id)

    async def process_oversized(
        self,
        header_block: bytes,
        size: int,
        *,
        arrival: float | None = None,
        message_id: str | None = None,
        release: str | None = None,
    ) -> Outcome:
        self.oversized.append((header_block, size))
        return self._outcome(header_block, size, known_id=message_id)


async def make_pipeline(kind: str, config: EmailConfig, metrics: Metrics) -> InboundPipeline:
    """``"stub"``: HeaderPipeline; ``"real"``: inbound.InboundPipeline (skips while a stub)."""
    if kind == "stub":
        return HeaderPipeline(config, metrics=metrics)
    real = InboundPipeline(config, metrics=metrics)
    try:
        await real.process(mail(0, tag="probe"))
    except NotImplementedError:
        pytest.skip("inbound.py is still the interface stub")
    return real


def mail(
    n: int,
    *,
    sender: str = SENDER,
    to: str = "bot@example.test",
    size: int = 0,
    tag: str = "t",
) -> bytes:
    """A small RFC 5322 message with a predictable Message-ID ``<tag-n@example.test>``."""
    body = f"Hello number {n}.\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (
        f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: message {n}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{tag}-{n}@example.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def mid(n: int, tag: str = "t") -> str:
    return f"<{tag}-{n}@example.test>"


def imap_config(
    server: DovecotServer,
    account: Account,
    state_dir: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    **overrides: Any,
) -> EmailConfig:
    fields: dict[str, Any] = {
        "imap_host": host or "127.0.0.1",
        "imap_port": port or server.imaps_port,
        "from_address": account.address,
        "allowed_senders": ["*"],
        "connect_timeout_secs": 5.0,
        "command_timeout_secs": 5.0,
        "keepalive_secs": 30,
        "poll_interval_secs": 1,
    }
    fields.update(overrides)
    return build_config(state_dir, dovecot=server, account=account, **fields)


@dataclass
class Running:
    engine: SyncEngine
    queue: asyncio.Queue[ChannelMessage]
    metrics: Metrics
    task: asyncio.Task[None]

    async def next(self, timeout: float = 10.0) -> ChannelMessage:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def take(self, count: int, timeout: float = 15.0) -> list[str]:
        """The ids of the next ``count`` messages, failing after ``timeout`` seconds."""
        ids: list[str] = []

        async def collect() -> None:
            while len(ids) < count:
                ids.append((await self.queue.get()).id)

        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            raise AssertionError(f"got {len(ids)} of {count} messages: {ids}") from None
        return ids

    async def synced(self, timeout: float = 10.0) -> None:
        """Wait for the next completed sync pass."""
        self.engine.synced.clear()
        await asyncio.wait_for(self.engine.synced.wait(), timeout)

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` is true, checking on every loop turn briefly."""

        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def running_engine(
    config: EmailConfig, *, pipeline: str | InboundPipeline = "stub", fast: bool = True
) -> AsyncIterator[Running]:
    """Start a SyncEngine on its own store; on exit cancel it and close the store."""
    metrics = Metrics()
    if isinstance(pipeline, InboundPipeline):
        pipe = pipeline
    else:
        pipe = await make_pipeline(pipeline, config, metrics)
    store = await StateStore(config.state_dir).open()
    engine = SyncEngine(
        config,
        store,
        pipe,
        metrics,
        backoff=Backoff(base=0.2, cap=1.0) if fast else None,
        auth_backoff=Backoff(base=0.5, cap=2.0) if fast else None,
    )
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    task = asyncio.create_task(engine.run(queue))
    try:
        yield Running(engine, queue, metrics, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
