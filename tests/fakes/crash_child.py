"""Child process of the commit-point crash harness (tests/test_crash_points.py).

It runs a real :class:`~prx_channel_email.channel.EmailChannel` whose Storage is
wrapped by :class:`KillingStorage`: every state write the inbound flow makes goes
through the wrapper, which names it (its *commit point*, e.g. ``handoff#2``: the
second hand-off transaction of this run) and, when it is the point the test asked
for, SIGKILLs this process just before the write, or just after it committed.
The production code carries no hook for this: the wrapper is the Storage the
channel was given.

The child is the host too: it takes every message off the queue, writes
``GOT <id> <redelivered>`` to the event file, and with ``handoff="ack"`` acks it
(``ACKING <id>``, then ``ACKED <id>`` once ``ack()`` returned). Once mail from
``remove`` waits (deferred), it takes that sender off the allow-list: that mail is
then refused at release.

Events are single ``os.write`` calls to an O_APPEND file: what was written before
the kill is on the file, as the host's own records would be. The run ends by
itself: killed at the point, or (nothing left to do: every expected message
reached the host, nothing waits, nothing is in flight, the cursor is past the
last UID) after a clean ``close()``, with ``FINISHED`` and exit code 0, or 3 when
a kill point was asked for and never reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from prx_channel_email import channel as channel_module
from prx_channel_email._storage import DELIVERED, HandoffBatch, Storage, storage_of
from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError
from prx_channel_email.models import ChannelMessage

NOT_REACHED = 3

# What the channel may call on its Storage without writing: the reads, the lifecycle,
# and the outbox and token stores (their own kill tests: tests/test_outbox.py,
# tests/test_oauth*.py). Every other method is a write and is named below; one added
# to the protocol later is recorded under its own name, so the census sees it.
NOT_WRITES = frozenset(
    {
        "open", "close", "migrations", "location", "outbox", "tokens",
        "get_cursor", "in_flight", "handed_on", "find_message", "latest_from",
        "latest_in_thread", "waiting", "deferred_message", "quarantined",
        "recent_handoffs", "runtime_senders", "release_request", "pending_releases",
    }
)  # fmt: skip
NAMES = {
    "settle": "ack",  # the host's ack (a reply's settle is the outbox's)
    "set_cursor": "cursor",
    "refuse_waiting": "refuse",
    "change_sender": "sender",  # the host's allow-list change: not the inbound flow
    "request_release": "request",  # the operator's release request: not the inbound flow
    "fail_release": "release-failed",  # a release request the listener cannot carry out
    "prune_refused": "prune",  # housekeeping of old refused rows
}


def point_of(method: str, args: tuple[Any, ...]) -> str:
    """The commit point a write is: what it makes durable, most telling part first."""
    if method != "commit_handoff":
        return NAMES.get(method, method)
    batch: HandoffBatch = args[0]
    if batch.releases and any(r.outcome == DELIVERED for r in batch.records):
        return "unquarantine"  # a quarantined mail the operator released goes on
    if batch.releases:
        return "release"  # a deferred mail goes on (its in-flight row rides with it)
    if batch.deferrals:
        return "defer"  # accepted mail kept back (with whatever else rides along)
    if batch.in_flight:
        return "handoff"  # accepted mail in flight, the cursor past it
    if batch.records:
        return "record"  # refused / quarantined mail, the cursor past it
    if batch.settle:
        return "flush"  # queue mode: the last message put is settled
    return "cursor-move"  # duplicates only: the cursor moves


class Events:
    """The event file: one unbuffered write per line, so a SIGKILL loses none."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, *words: object) -> None:
        os.write(self.fd, (" ".join(map(str, words)) + "\n").encode())


def die(events: Events, point: str, when: str) -> None:
    events("KILL", point, when)
    os.kill(os.getpid(), signal.SIGKILL)


class KillingStorage:
    """The channel's Storage, with every write named and one of them fatal.

    ``kill``: ``(point, when)``, e.g. ``("handoff#2", "after")``; None kills nothing
    (a census run: it only records the writes).
    """

    def __init__(self, inner: Storage, events: Events, kill: tuple[str, str] | None) -> None:
        self._inner = inner
        self._events = events
        self._kill = kill
        self._counts: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name in NOT_WRITES or name.startswith("_") or not callable(value):
            return value
        return self._wrap(name, value)

    def _wrap(self, method: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def write(*args: Any, **kwargs: Any) -> Any:
            kind = point_of(method, args)
            self._counts[kind] += 1
            point = f"{kind}#{self._counts[kind]}"
            self._events("WRITE", point, method)
            if self._kill == (point, "before"):
                die(self._events, point, "before")
            result = await call(*args, **kwargs)
            self._events("WROTE", point)
            if self._kill == (point, "after"):
                die(self._events, point, "after")
            return result

        return write

    async def __aenter__(self) -> KillingStorage:
        await self._inner.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.close()


async def serve(spec: dict[str, Any]) -> int:
    config = EmailConfig(**spec["config"])
    events = Events(spec["events"])
    kill = tuple(spec["kill"]) if spec.get("kill") else None
    expected: set[str] = set(spec["expect"])
    got: set[str] = set(spec["seen"])
    remove: str | None = spec.get("remove")
    release = bool(spec.get("release"))  # release quarantined mail the host expects
    releasing: set[asyncio.Task[None]] = set()
    stuck = ""  # what the run still waits for (written out if it never comes)
    top_uid: int = spec["top_uid"]
    stores: list[KillingStorage] = []

    def wrapped(cfg: EmailConfig) -> Storage:
        store = KillingStorage(storage_of(cfg), events, kill)  # type: ignore[arg-type]
        stores.append(store)
        return store  # type: ignore[return-value]

    channel_module.storage_of = wrapped  # type: ignore[assignment]
    channel = EmailChannel(config)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()

    async def host() -> None:
        while True:
            message = await queue.get()
            events("GOT", message.id, int(message.redelivered))
            got.add(message.id)
            if config.handoff == "ack":
                events("ACKING", message.id)
                await channel.ack(message)
                events("ACKED", message.id)

    async def release_one(id_: str) -> None:
        events("RELEASING", id_)
        try:
            await channel.release_quarantined(id_, timeout=20)
        except ChannelError as exc:  # e.g. carried out already, by the previous run
            events("RELEASE_REFUSED", id_, exc.code)

    async def quiet() -> bool:
        nonlocal remove, release, stuck
        if release:
            held = [q for q in await channel.quarantined() if q.message_id in expected - got]
            if held:  # as an operator would, once it is listed
                release = False
                for q in held:
                    releasing.add(asyncio.create_task(release_one(q.id)))
        store, mailbox = stores[0], channel.sync.mailbox
        waiting = await store.waiting(mailbox)
        if remove is not None and any(w.sender == remove for w in waiting):
            # Deterministically while its mail waits: refused at release, not by the policy.
            await channel.remove_sender(remove)
            events("REMOVED", remove)
            remove = None
        cursor = await store.get_cursor(mailbox)
        in_flight = await store.in_flight(mailbox)
        stuck = (
            f"missing={sorted(expected - got)} waiting={[w.message_id for w in waiting]}"
            f" in_flight={[r.message_id for r in in_flight]} cursor={cursor}"
        )
        return (
            expected <= got
            and not waiting
            and not in_flight
            and cursor is not None
            and cursor.uidvalidity == spec["uidvalidity"]
            and cursor.last_uid >= top_uid
        )

    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        consumer = asyncio.create_task(host())
        try:
            async with asyncio.timeout(spec.get("timeout", 30)):
                while not await quiet():
                    for task in (listener, consumer):
                        if task.done():
                            task.result()  # a crash of the channel or the host: say so
                    await asyncio.sleep(0.05)
        except TimeoutError:
            events("STUCK", stuck.replace(" ", ";"))
            raise
        finally:
            consumer.cancel()
            listener.cancel()
            for task in (consumer, listener, *releasing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    events("FINISHED")
    return NOT_REACHED if kill is not None else 0  # the point would have killed it


def main(spec: dict[str, Any]) -> None:
    """The multiprocessing target: exit code 0 (finished), 3 (point never reached);
    a SIGKILL at the point shows as -9. Its log goes to ``spec["log"]``."""
    log = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 2)
    code = asyncio.run(serve(spec))
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
