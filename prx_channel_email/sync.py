"""The sync engine: keeps an IMAP session alive and hands each new message on once.

The loop, per connection: SELECT the folder, compare UIDVALIDITY with the stored
cursor, hand on every message above the cursor, then wait for a push (IDLE) or the
next poll, and repeat. What a crash at each step means:

* before ``queue.put``: the message is still above the cursor, so the next start
  fetches it again (nothing is lost);
* between ``queue.put`` and the ledger/cursor transaction: it is handed on again
  at the next start (at least once, never lost);
* after that transaction: never again; the ledger also catches the same
  Message-ID showing up under another UID (UIDVALIDITY change, a copy).

Nothing here marks mail ``\\Seen`` by fetching (``BODY.PEEK``); the optional
``mark_seen`` / ``move_to_folder`` run only after the ledger row is on disk.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .backoff import Backoff
from .config import EmailConfig
from .envelope import header_message_id
from .errors import AuthenticationError, ChannelError, FolderNotFoundError, TransportError
from .imap import FetchedMessage, ImapSession, SelectInfo, open_session
from .inbound import InboundPipeline, Outcome
from .message_ids import synthetic_message_id
from .models import ChannelMessage
from .observability import Metrics, log_event
from .store import Cursor, Decided, StateStore

log = logging.getLogger("prx_channel_email.sync")

# Bytes of message bodies fetched in one UID FETCH (bounds memory during a backlog).
FETCH_BYTES_BUDGET = 8 * 1024 * 1024
# A message listed by SEARCH but missing from a FETCH answer (some servers do this
# while they sync internally) is fetched again, after 1 s, 2 s, 4 s ... (at most 30 s),
# and skipped with an error only once it has been missing for MISSING_GIVE_UP_SECS
# and MISSING_BODY_RETRIES fetches. Meanwhile the cursor waits in front of it.
MISSING_BODY_RETRIES = 3
MISSING_GIVE_UP_SECS = 300.0
MISSING_RETRY_BASE_SECS = 1.0


class _RefetchNeeded(Exception):
    """A listed message came back without its body: stop before it, sync again."""

    def __init__(self, uid: int, delay: float) -> None:
        super().__init__(uid)
        self.delay = delay


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass
class SyncStatus:
    connected: bool = False
    mode: str | None = None  # "idle" | "poll"
    auth_failed: bool = False
    last_error: str | None = None
    last_error_code: str | None = None
    uidvalidity: int | None = None
    last_uid: int | None = None
    last_sync_at: float | None = None
    reconnect_in_secs: float | None = None
    idling: bool = False  # in IDLE right now, waiting for a push


class SyncEngine:
    """Runs until cancelled; reconnects with backoff after any failure, never gives up."""

    def __init__(
        self,
        config: EmailConfig,
        store: StateStore,
        pipeline: InboundPipeline,
        metrics: Metrics,
        *,
        backoff: Backoff | None = None,
        auth_backoff: Backoff | None = None,
        session_factory: Callable[[EmailConfig], Awaitable[ImapSession]] = open_session,
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.status = SyncStatus()
        self.account = config.account
        self.folder = config.imap_folder
        self.backoff = backoff or Backoff(base=1.0, cap=300.0)
        # A refused password does not fix itself in a second; hammering the server
        # with bad logins can also get the account locked.
        self.auth_backoff = auth_backoff or Backoff(base=30.0, cap=1800.0)
        self._open = session_factory
        self._idle_refused = False  # the server advertised IDLE but refused it: poll instead
        self._missing: dict[int, tuple[int, float]] = {}  # uid -> (misses, first miss)
        self._resync_in: float | None = None  # fetch again after this long (a missing body)
        self.synced = asyncio.Event()  # set after each completed sync pass (tests, doctor)

    # --- the outer loop: connect, serve, back off ---

    async def run(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        while True:
            session: ImapSession | None = None
            delay: float
            try:
                session = await self._open(self.config)
                self.metrics.inc("imap.connects")
                self.status.connected = True
                self.status.auth_failed = False
                self.auth_backoff.reset()
                log_event(log, logging.INFO, "imap.connected", account=self.account,
                          folder=self.folder, host=session.host, port=session.port)  # fmt: skip
                await self._serve(session, queue)  # returns only by raising
                continue
            except AuthenticationError as exc:
                self.status.auth_failed = True
                self.metrics.inc("imap.reconnects.auth")
                delay = self.auth_backoff.next()
                self._failed(exc, "imap.auth_failed", logging.ERROR, delay)
            except (TransportError, OSError, TimeoutError) as exc:
                self.metrics.inc("imap.reconnects.network")
                delay = self.backoff.next()
                self._failed(exc, "imap.disconnected", logging.WARNING, delay)
            except ChannelError as exc:
                self.metrics.inc("imap.reconnects.error")
                delay = self.backoff.next()
                level = logging.ERROR if isinstance(exc, FolderNotFoundError) else logging.WARNING
                self._failed(exc, "imap.session_failed", level, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the listener for good
                self.metrics.inc("imap.reconnects.error")
                self.metrics.inc("inbound.errors")
                delay = self.backoff.next()
                self._failed(exc, "imap.unexpected_error", logging.ERROR, delay)
                log.debug("traceback", exc_info=exc)
            finally:
                self.status.connected = False
                if session is not None:
                    await _close(session)
            self.status.reconnect_in_secs = delay
            await asyncio.sleep(delay)
            self.status.reconnect_in_secs = None

    def _failed(self, exc: BaseException, event: str, level: int, delay: float) -> None:
        self.status.last_error = str(exc)
        self.status.last_error_code = getattr(exc, "code", None) or type(exc).__name__
        log_event(log, level, event, exc=exc, account=self.account, folder=self.folder,
                  code=self.status.last_error_code, retry_in=f"{delay:.1f}s")  # fmt: skip

    # --- one session ---

    async def _serve(self, session: ImapSession, queue: asyncio.Queue[ChannelMessage]) -> None:
        info = await session.select(self.folder)
        use_idle = session.has_idle and not self._idle_refused
        self.status.mode = "idle" if use_idle else "poll"
        self.status.uidvalidity = info.uidvalidity
        while True:
            session.changed.clear()
            await self._sync(session, info, queue)
            self.status.last_sync_at = time.time()
            self.status.last_error = self.status.last_error_code = None
            self.backoff.reset()  # the session is healthy: the next failure starts at 1 s
            self.synced.set()
            if session.changed.is_set():
                continue  # mail was announced while we synced
            if self._resync_in is not None:
                delay, self._resync_in = self._resync_in, None
                await asyncio.sleep(delay)  # give the server a moment, then ask again
                continue
            if self.status.mode == "idle":
                await self._idle_once(session)
            else:
                await asyncio.sleep(self.config.poll_interval_secs)
                await session.noop(self._probe_timeout)

    @property
    def _probe_timeout(self) -> float:
        return float(min(self.config.command_timeout_secs, max(self.config.keepalive_secs, 2)))

    async def _idle_once(self, session: ImapSession) -> None:
        """One IDLE cycle, ended by a push, the keepalive or the 29-minute re-arm."""
        wait = float(min(self.config.keepalive_secs, self.config.idle_timeout_secs))
        try:
            await session.idle_start()
        except ChannelError as exc:
            if exc.code != "idle_failed":
                raise
            # Advertised but refused (some proxies do this): poll rather than fail forever.
            self._idle_refused = True
            self.status.mode = "poll"
            log_event(log, logging.WARNING, "imap.idle_refused", exc=exc, account=self.account,
                      folder=self.folder, code="idle_failed")  # fmt: skip
            return
        self.status.idling = True
        try:
            arrived = await session.idle_wait(wait)
        finally:
            self.status.idling = False
        # DONE must be answered; a connection that died silently shows up here.
        await session.idle_done(self._probe_timeout)
        if not arrived:
            await session.noop(self._probe_timeout)
        self.metrics.inc("imap.idle_cycles")

    # --- what to fetch ---

    async def _sync(
        self,
        session: ImapSession,
        info: SelectInfo,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        uv = info.uidvalidity
        cursor = await self.store.get_cursor(self.account, self.folder)
        if cursor is None:
            if self.config.initial_sync == "unseen":
                unseen = await session.uid_search("UNSEEN")
                log_event(log, logging.INFO, "inbound.first_start", account=self.account,
                          folder=self.folder, mode="unseen", count=len(unseen))  # fmt: skip
                if not await self._handle(session, uv, unseen, queue, move_cursor=False):
                    return  # stopped before a message it must fetch again: no baseline yet
            else:
                log_event(log, logging.INFO, "inbound.first_start", account=self.account,
                          folder=self.folder, mode="new", baseline=info.uidnext - 1)  # fmt: skip
            # UIDNEXT is from SELECT, so anything that arrived since is still above it.
            await self.store.set_cursor(self.account, self.folder, Cursor(uv, info.uidnext - 1))
            return
        if cursor.uidvalidity != uv:
            await self._rebaseline(session, info, cursor, queue)
            return
        uids = await session.uid_search("UID", f"{cursor.last_uid + 1}:*")
        await self._handle(session, uv, [u for u in uids if u > cursor.last_uid], queue)
        if time.time() - cursor.updated_at > 3600:
            # Keep "last synced" fresh: a later UIDVALIDITY change rechecks mail since then.
            await self.store.set_cursor(self.account, self.folder, cursor)

    async def _rebaseline(
        self,
        session: ImapSession,
        info: SelectInfo,
        old: Cursor,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """UIDVALIDITY changed: our UIDs mean nothing now.

        Mail that arrived since the last sync (by date, with a day of slack for time
        zones) is looked at again; the ledger drops what was already handed on, so
        nothing is replayed and nothing that came in meanwhile is lost.
        """
        self.metrics.inc("imap.uidvalidity_changes")
        since = time.gmtime((old.updated_at or time.time()) - 86400)
        date = time.strftime("%d-%b-%Y", since)
        uids = await session.uid_search("SINCE", date)
        log_event(log, logging.WARNING, "inbound.uidvalidity_changed", account=self.account,
                  folder=self.folder, old=old.uidvalidity, new=info.uidvalidity,
                  rechecked=len(uids), code="uidvalidity_changed")  # fmt: skip
        if await self._handle(session, info.uidvalidity, uids, queue, move_cursor=False):
            await self.store.set_cursor(
                self.account, self.folder, Cursor(info.uidvalidity, info.uidnext - 1)
            )

    # --- handing messages on ---

    async def _handle(
        self,
        session: ImapSession,
        uv: int,
        uids: list[int],
        queue: asyncio.Queue[ChannelMessage],
        *,
        move_cursor: bool = True,
    ) -> bool:
        """Hand on ``uids`` in ascending order, in bounded windows.

        False when it stopped early at a message it must fetch again (the cursor
        then sits just before that message, and a new pass follows at once).
        """
        uids = sorted(uids)
        window = self.config.fetch_batch_size * 10
        for start in range(0, len(uids), window):
            chunk = uids[start : start + window]
            if not await self._handle_window(session, uv, chunk, queue, move_cursor):
                return False
        return True

    async def _handle_window(
        self,
        session: ImapSession,
        uv: int,
        uids: list[int],
        queue: asyncio.Queue[ChannelMessage],
        move_cursor: bool = True,
    ) -> bool:
        """Sizes and Message-IDs first, then bodies: the next chunk downloads while
        this one is handed on, and each ledger write overlaps the next message."""
        meta = await session.fetch_meta(uids)
        header_ids = {uid: _header_id(m.data) for uid, m in meta.items()}
        known = await self.store.seen_ids(self.account, [m for m in header_ids.values() if m])
        steps = _plan(
            uids,
            meta,
            header_ids,
            known,
            self.config.max_message_bytes,
            self.config.fetch_batch_size,
        )
        hand = _Handoff(self, uv, queue, header_ids, move_cursor)
        ahead: asyncio.Task[dict[int, bytes]] | None = None
        complete = True
        try:
            for i, step in enumerate(steps):
                if ahead is None:
                    ahead = asyncio.create_task(self._download(session, step, meta))
                data = await ahead
                ahead = None
                if i + 1 < len(steps):
                    ahead = asyncio.create_task(self._download(session, steps[i + 1], meta))
                await self._process_step(step, data, meta, hand)
        except _RefetchNeeded as need:
            complete = False
            self._resync_in = need.delay  # the serve loop syncs again, from the cursor
        finally:
            if ahead is not None:
                ahead.cancel()
            await _to_completion(hand.flush())
        if hand.delivered:
            await self._after_handoff(session, hand.delivered)
        return complete

    async def _download(
        self, session: ImapSession, step: _Step, meta: dict[int, FetchedMessage]
    ) -> dict[int, bytes]:
        kind, uids = step
        if kind == "bodies":
            expected = sum(meta[u].size or 0 for u in uids if u in meta)
            bodies = await session.fetch_bodies(uids, total_bytes=expected)
            self.metrics.inc("inbound.fetched", len(bodies))
            return bodies
        if kind == "oversized":
            return await session.fetch_headers(uids)
        return {}

    async def _process_step(
        self,
        step: _Step,
        data: dict[int, bytes],
        meta: dict[int, FetchedMessage],
        hand: _Handoff,
    ) -> None:
        kind, uids = step
        for uid in uids:
            header_id = hand.header_ids.get(uid)
            if kind == "duplicate":
                hand.skip(uid, header_id or "")
                continue
            raw = data.get(uid)
            if raw is None:  # kind "missing", or a FETCH answer that left it out
                self._body_missing(uid, header_id)  # raises unless it is time to give up
                continue
            self._missing.pop(uid, None)
            if kind == "oversized":
                outcome = await self._judge_oversized(uid, raw, meta[uid].size or 0, header_id)
            else:
                outcome = await self._judge(uid, raw, header_id)
            await hand.apply(outcome, uid)

    def _body_missing(self, uid: int, header_id: str | None) -> None:
        """Never let the cursor pass a message we did not get: stop here and fetch it
        again, backing off. Expunged meanwhile, it is no longer listed and the next pass
        moves on; still listed after the give-up time, it is skipped with an error."""
        misses, first = self._missing.get(uid, (0, time.monotonic()))
        misses += 1
        waited = time.monotonic() - first
        if misses < MISSING_BODY_RETRIES or waited < MISSING_GIVE_UP_SECS:
            self._missing[uid] = (misses, first)
            delay = min(MISSING_RETRY_BASE_SECS * 2 ** (misses - 1), 30.0)
            log_event(log, logging.WARNING, "inbound.fetch_incomplete", account=self.account,
                      folder=self.folder, uid=uid, message_id=header_id, misses=misses,
                      retry_in=f"{delay:.1f}s", code="fetch_incomplete")  # fmt: skip
            raise _RefetchNeeded(uid, delay)
        tries = misses
        self._missing.pop(uid, None)
        self.metrics.inc("inbound.errors")
        log_event(log, logging.ERROR, "inbound.body_missing", account=self.account,
                  folder=self.folder, uid=uid, message_id=header_id, tries=tries,
                  code="body_missing")  # fmt: skip

    async def _judge(self, uid: int, raw: bytes, header_id: str | None) -> Outcome:
        try:
            return await self.pipeline.process(raw, arrival=time.time())
        except Exception as exc:  # bad mail must not stop the listener
            return self._pipeline_failed(exc, uid, header_id or synthetic_message_id(raw))

    async def _judge_oversized(
        self, uid: int, header: bytes, size: int, header_id: str | None
    ) -> Outcome:
        """Too big to download: only the header goes to the policy, which may send a notice."""
        self.metrics.inc("inbound.too_large")
        log_event(log, logging.WARNING, "inbound.too_large", account=self.account,
                  folder=self.folder, uid=uid, message_id=header_id, size=size,
                  limit=self.config.max_message_bytes, code="too_large")  # fmt: skip
        try:
            return await self.pipeline.process_oversized(header, size, arrival=time.time())
        except Exception as exc:
            return self._pipeline_failed(exc, uid, header_id or synthetic_message_id(header))

    def _pipeline_failed(self, exc: Exception, uid: int, mid: str) -> Outcome:
        self.metrics.inc("inbound.errors")
        log_event(log, logging.ERROR, "inbound.pipeline_failed", exc=exc, account=self.account,
                  folder=self.folder, uid=uid, message_id=mid, code="pipeline_error")  # fmt: skip
        return Outcome("quarantine", mid, reason=f"pipeline_error:{type(exc).__name__}")

    async def _after_handoff(self, session: ImapSession, uids: list[int]) -> None:
        """Optional ``\\Seen`` / move, for delivered mail only (rejected mail stays as it was)."""
        try:
            if self.config.mark_seen:
                await session.store_flags(uids, "(\\Seen)")
            if self.config.move_to_folder:
                await session.move(uids, self.config.move_to_folder)
                self.metrics.inc("inbound.moved", len(uids))
        except TransportError:
            raise
        except ChannelError as exc:
            # The messages are handed on and recorded; only the tidy-up failed.
            self.metrics.inc("inbound.errors")
            log_event(log, logging.WARNING, "inbound.after_handoff_failed", exc=exc,
                      account=self.account, folder=self.folder, uid=uid_list(uids))  # fmt: skip


_Step = tuple[str, list[int]]


class _Handoff:
    """Puts decided messages on the queue and writes their ledger rows, in UID order.

    Ledger writes are group-committed: one writer runs at a time and takes every
    row queued meanwhile into one transaction. A lone message commits at once;
    during a backlog the next messages are parsed while the last ones commit.
    Every row is queued only after its message is on the queue; ``flush`` waits
    until all of them are on disk.
    """

    def __init__(
        self,
        engine: SyncEngine,
        uv: int,
        queue: asyncio.Queue[ChannelMessage],
        header_ids: dict[int, str | None],
        move_cursor: bool = True,
    ) -> None:
        self.engine = engine
        self.uv = uv
        self.queue = queue
        self.header_ids = header_ids
        self.move_cursor = move_cursor
        self.delivered: list[int] = []
        self._handled: set[str] = set()
        self._pending: list[Decided] = []
        self._writer: asyncio.Task[None] | None = None

    def _write(self, item: Decided) -> None:
        self._pending.append(item)
        if self._writer is None or self._writer.done():
            if self._writer is not None and self._writer.exception() is not None:
                return  # flush() raises it
            self._writer = asyncio.ensure_future(self._commit())

    async def _commit(self) -> None:
        e = self.engine
        while self._pending:
            items, self._pending = self._pending, []
            await e.store.record_many(e.account, e.folder, items, move_cursor=self.move_cursor)

    async def flush(self) -> None:
        while self._writer is not None:
            writer = self._writer
            await writer
            if writer is self._writer and not self._pending:
                self._writer = None
            elif writer is self._writer:
                self._writer = asyncio.ensure_future(self._commit())

    def skip(self, uid: int, mid: str) -> None:
        e = self.engine
        self._write(Decided(Cursor(self.uv, uid), None))
        e.metrics.inc("inbound.skipped.duplicate")
        log_event(log, logging.INFO, "inbound.duplicate", account=e.account, folder=e.folder,
                  uid=uid, message_id=mid, code="duplicate")  # fmt: skip

    async def apply(self, outcome: Outcome, uid: int) -> None:
        e = self.engine
        mid = outcome.message_id
        # The pipeline's id is what the ledger keys on; when it differs from the header
        # id checked before the download (synthetic, normalized), check it now.
        if mid in self._handled or (
            mid != self.header_ids.get(uid) and await e.store.seen_ids(e.account, [mid])
        ):
            self.skip(uid, mid)
            return
        self._handled.add(mid)
        cursor = Cursor(self.uv, uid)
        if outcome.decision == "deliver" and outcome.message is not None:
            if outcome.entry is not None:
                e.store.stage(e.account, outcome.entry)
            await self.queue.put(outcome.message)
            # From here the message is the framework's: its ledger row must reach the
            # disk even if we are cancelled now (flush runs to completion), or the
            # next start would hand it on again.
            self._write(Decided(cursor, mid, "delivered", None, uid, outcome.entry))
            e.metrics.inc("inbound.handed_on")
            self.delivered.append(uid)
            log_event(log, logging.INFO, "inbound.handed_on", account=e.account,
                      folder=e.folder, uid=uid, message_id=mid)  # fmt: skip
        else:
            kind = "rejected" if outcome.decision == "reject" else "quarantined"
            reason = outcome.reason or kind
            self._write(Decided(cursor, mid, kind, reason, uid))
            # The pipeline counts its decisions (inbound.skipped.<reason>); we log the UID.
            log_event(log, logging.DEBUG, f"inbound.recorded_{kind}", account=e.account,
                      folder=e.folder, uid=uid, message_id=mid, code=reason)  # fmt: skip
        e.status.last_uid = uid


def _plan(
    uids: list[int],
    meta: dict[int, FetchedMessage],
    header_ids: dict[int, str | None],
    known: set[str],
    max_bytes: int,
    batch_size: int,
) -> list[_Step]:
    """Split UIDs, in order, into body fetches (bounded in count and bytes) and single steps."""
    steps: list[_Step] = []
    pending: list[int] = []
    pending_bytes = 0
    for uid in uids:
        m = meta.get(uid)
        if m is None:  # expunged since SEARCH, or left out: find out by asking again
            if pending:
                steps.append(("bodies", pending))
                pending, pending_bytes = [], 0
            steps.append(("missing", [uid]))
            continue
        mid = header_ids.get(uid)
        size = m.size or 0
        kind = "bodies"
        if mid is not None and mid in known:
            kind = "duplicate"
        elif size > max_bytes:
            kind = "oversized"
        full = len(pending) >= batch_size or pending_bytes + size > FETCH_BYTES_BUDGET
        if pending and (kind != "bodies" or full):
            steps.append(("bodies", pending))
            pending, pending_bytes = [], 0
        if kind == "bodies":
            pending.append(uid)
            pending_bytes += size
        else:
            steps.append((kind, [uid]))
    if pending:
        steps.append(("bodies", pending))
    return steps


def uid_list(uids: list[int]) -> str:
    return ",".join(map(str, uids[:20])) + ("..." if len(uids) > 20 else "")


def _header_id(block: bytes | None) -> str | None:
    if not block:
        return None
    value = _HEADER_PARSER.parsebytes(block).get("Message-ID")
    return header_message_id(str(value)) if value is not None else None


async def _to_completion(aw: Awaitable[None]) -> None:
    """Finish ``aw`` even when cancelled meanwhile; the cancellation is re-raised after."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _close(session: ImapSession) -> None:
    if session.is_open:
        await session.logout()
    else:
        session.abort()
