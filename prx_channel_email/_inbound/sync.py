"""The sync engine: keeps an IMAP session alive and decides what to fetch and hand on.

The loop, per connection: SELECT the folder, compare UIDVALIDITY with the stored
cursor, hand on every message above the cursor, then wait for a push (IDLE) or the
next poll, and repeat. A pass returns a :class:`PassResult`; it stops early (and
asks for a new pass) only before a message whose body did not come.

Per message: its identity (header Message-ID, else a hash of the bytes) and sender
come from the size fetch; mail already handed on with that id and sender is skipped
before download; the rest goes through the pipeline, and the accepted mail through
:class:`~prx_channel_email._handoff.ledger.LedgerWriter`, which commits before it puts. What
a crash at each step means is listed there (and in the README's crash table).

Nothing here marks mail ``\\Seen`` by fetching (``BODY.PEEK``); the optional
``mark_seen`` / ``move_to_folder`` run only once a message is handled: after its
state write (``handoff="queue"``), or after its acknowledgement (``"ack"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from prx_channel_email._handoff.ledger import HandoffLedger, LedgerWriter
from prx_channel_email._inbound.deferred import DeferredMail
from prx_channel_email._inbound.pipeline import InboundPipeline, Outcome, message_identity
from prx_channel_email._inbound.quarantine import unreadable
from prx_channel_email._mail.envelope import header_message_id, sender_of
from prx_channel_email._mail.headers import Headers
from prx_channel_email._net.imap import (
    FetchedMessage,
    ImapSession,
    SelectInfo,
    open_session,
    push_fix,
)
from prx_channel_email._storage import Cursor, LeaseLost, Mailbox, ReleaseRequest, Storage
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email._support.tasks import to_completion
from prx_channel_email.config import DEFAULT_ACCOUNT, EmailConfig
from prx_channel_email.errors import (
    AuthenticationError,
    ChannelError,
    FolderNotFoundError,
    StorageError,
    TransportError,
)
from prx_channel_email.models import ChannelMessage
from prx_channel_email.status import StatusReporter

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
# A -1 cursor is repaired from INTERNALDATEs (whole seconds, the server's clock):
# mail this close to the moment the cursor was written counts as arrived after it.
CURSOR_REPAIR_SLACK_SECS = 5.0


@dataclass(frozen=True)
class PassResult:
    """How a pass over some UIDs ended.

    ``complete``: every UID was decided. Otherwise it stopped before a message whose
    body did not come (the cursor sits just before it) and wants a new pass from the
    cursor after ``resync_in`` seconds.
    """

    complete: bool = True
    resync_in: float | None = None


DONE = PassResult()


class StepKind(Enum):
    BODIES = "bodies"  # download whole messages, then decide
    OVERSIZED = "oversized"  # above max_message_bytes: decide on the header alone
    DUPLICATE = "duplicate"  # its Message-ID was handed on before: skip, move the cursor
    MISSING = "missing"  # listed by SEARCH but absent from the size fetch: ask again


@dataclass(frozen=True)
class Step:
    kind: StepKind
    uids: list[int]


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
    # storage_full / storage_readonly / storage_error while the hand-off is paused
    # on a state write that failed (retried with backoff); None when writable.
    storage_error: str | None = None
    # The server advertises IDLE but new mail shows up only on the keepalive checks.
    push_silent: bool = False


class PushWatch:
    """Measures push instead of assuming it.

    A server may advertise IDLE and still tell nothing until its own periodic
    check (Cyrus without ``idled``, Courier with ``IMAP_ENHANCEDIDLE=0``): the
    channel then answers a keepalive late. An IDLE cycle that ran out without a
    push, followed by a pass that finds new mail, is a miss (counted as
    ``imap.push_missed``; pushes as ``imap.idle_pushes``). Mail can also land in
    the instant between the end of IDLE and the search (Dovecot announces half a
    second late), so one miss proves nothing: two in a row, with no push between
    them, log the fix, once.
    """

    WARN_AFTER = 2

    def __init__(self, account: str, folder: str, metrics: Metrics) -> None:
        self.account = account
        self.folder = folder
        self.metrics = metrics
        self.misses = 0
        self.silent = False

    def pushed(self) -> None:
        self.metrics.inc("imap.idle_pushes")
        self.misses = 0  # the server does push: a miss before was a near one

    def missed(self, session: ImapSession, found: int) -> None:
        self.misses += 1
        self.metrics.inc("imap.push_missed")
        if self.misses < self.WARN_AFTER or self.silent:
            return
        self.silent = True
        log_event(log, logging.WARNING, "imap.push_silent", account=self.account,
                  folder=self.folder, host=session.host, misses=self.misses, found=found,
                  fix=push_fix(session.greeting), code="push_silent")  # fmt: skip


class SyncEngine:
    """Runs until cancelled; reconnects with backoff after any failure, never gives up."""

    def __init__(
        self,
        config: EmailConfig,
        store: Storage,
        pipeline: InboundPipeline,
        metrics: Metrics,
        *,
        backoff: Backoff | None = None,
        auth_backoff: Backoff | None = None,
        session_factory: Callable[[EmailConfig], Awaitable[ImapSession]] = open_session,
        storage_backoff: Backoff | None = None,
        reporter: StatusReporter | None = None,
        ledger: HandoffLedger | None = None,
        folder: str | None = None,
        name: str = DEFAULT_ACCOUNT,
    ) -> None:
        """``folder``: the mailbox this engine serves (default: the config's
        ``imap_folder``); ``name``: the account's name, stamped on its messages."""
        self.config = config
        self.reporter = reporter or StatusReporter(config.account)
        self.store = store
        self.pipeline = pipeline
        self.metrics = metrics
        self.status = SyncStatus()
        self.account = config.account
        self.name = name
        # The configured name: the key of its state.
        self.folder = folder or config.imap_folder
        self._stamp = {"account": name, "folder": self.folder}
        self.mailbox = Mailbox(self.account, self.folder)
        self.wire_folder = self.folder  # the server's name for it (see ImapSession.resolve_folder)
        self.push = PushWatch(self.account, self.folder, metrics)
        self._quiet_idle = False  # the last IDLE cycle ran out without a push
        self.backoff = backoff or Backoff(base=1.0, cap=300.0)
        # A refused password does not fix itself in a second; hammering the server
        # with bad logins can also get the account locked.
        self.auth_backoff = auth_backoff or Backoff(base=30.0, cap=1800.0)
        self._open = session_factory
        self._idle_refused = False  # the server advertised IDLE but refused it: poll instead
        self._missing: dict[int, tuple[int, float]] = {}  # uid -> (misses, first miss)
        self.writer = LedgerWriter(
            store,
            self.account,
            self.folder,
            metrics,
            handoff=config.handoff,
            on_storage=self._storage_changed,
            storage_backoff=storage_backoff,
            ledger=ledger,
        )
        self.ledger = self.writer.ledger
        self._redelivered = False  # what an earlier run left in flight went out again
        # Rate limits and the loop guard: accepted mail over a limit waits in the store.
        self.deferred = DeferredMail(
            config,
            store,
            metrics,
            folder=self.folder,
            allowed=pipeline.policy.allows,
            fence=lambda: self.writer.fence,
        )
        self.synced = asyncio.Event()  # set after each completed sync pass (tests, doctor)
        # Release requests of quarantined mail are looked at after the first pass of a
        # session and after a kick (a host's release, or the channel seeing a request).
        self._releases_due = True
        self._kick = asyncio.Event()

    # --- the outer loop: connect, serve, back off ---

    async def run(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        self.writer.resume()
        # Waiting mail and recent hand-offs first: they decide what the next mail does.
        await self.deferred.load()
        release = asyncio.create_task(
            self.deferred.run(
                lambda msg, rel: self.writer.hand_on_released(msg, rel, queue), self.writer.flush
            )
        )
        try:
            await self._connected(queue)
        finally:
            self.writer.stop_retrying()  # a settle paused on a broken disk must not hang the stop
            release.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await release

    def serve_under(self, fence: int | None) -> None:
        """Serve this mailbox under a lease whose fencing token is ``fence`` (replicas).

        Another replica may have served it meanwhile and left mail in flight: that is
        handed on again at the next start (what this run handed on itself is not).
        """
        self.writer.forget_unwritten()  # decided under an earlier lease: not ours to write
        self.writer.fence = fence
        self._redelivered = False

    async def _connected(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        while True:
            session: ImapSession | None = None
            delay: float
            try:
                if not self._redelivered:
                    await self.writer.redeliver(queue)
                    self._redelivered = True
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
            except LeaseLost:
                raise  # another replica serves this mailbox now: stop, do not retry
            except StorageError as exc:  # a read of the state failed (writes pause in place)
                self._storage_changed(exc)
                delay = self.backoff.next()
                self._failed(exc, "storage.read_failed", logging.ERROR, delay)
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

    def _storage_changed(self, fault: StorageError | None) -> None:
        self.status.storage_error = fault.code if fault is not None else None
        if fault is not None:
            self.status.last_error = str(fault)
            self.status.last_error_code = fault.code
            self.reporter.imap_failed(fault, None)  # the host sees the code, not "connected"
        elif self.status.connected:
            self.reporter.imap_ready()

    def _failed(self, exc: BaseException, event: str, level: int, delay: float) -> None:
        self.status.last_error = str(exc)
        self.status.last_error_code = getattr(exc, "code", None) or type(exc).__name__
        self.reporter.imap_failed(exc, delay)
        log_event(log, level, event, exc=exc, account=self.account, folder=self.folder,
                  code=self.status.last_error_code, retry_in=f"{delay:.1f}s")  # fmt: skip

    # --- one session ---

    async def _serve(self, session: ImapSession, queue: asyncio.Queue[ChannelMessage]) -> None:
        self.wire_folder = await session.resolve_folder(self.folder)
        info = await session.select(self.wire_folder)
        self.reporter.imap_ready()
        use_idle = session.has_idle and not self._idle_refused
        self.status.mode = "idle" if use_idle else "poll"
        self.status.uidvalidity = info.uidvalidity
        self._quiet_idle = False
        self._releases_due = True  # requests made while we were away
        while True:
            session.changed.clear()
            self._kick.clear()
            result = await self._sync(session, info, queue)
            if self._releases_due:
                self._releases_due = False
                await self._release_requested(session, info.uidvalidity, queue)
            self.status.last_sync_at = time.time()
            self.status.last_error = self.status.last_error_code = None
            self.status.storage_error = None  # a pass completes only once its writes did
            self.backoff.reset()  # the session is healthy: the next failure starts at 1 s
            if self.config.handoff == "ack":
                acked = self.writer.take_acked(info.uidvalidity)
                if acked:
                    await self._after_handoff(session, acked)
            self.synced.set()
            if session.changed.is_set() or self._kick.is_set():
                continue  # mail was announced (or a release asked for) while we synced
            if result.resync_in is not None:
                await asyncio.sleep(result.resync_in)  # give the server a moment, then ask again
                continue
            if self.status.mode == "idle":
                self._quiet_idle = not await self._idle_once(session)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.config.poll_interval_secs)
                await session.noop(self._probe_timeout)

    @property
    def _probe_timeout(self) -> float:
        return float(min(self.config.command_timeout_secs, max(self.config.keepalive_secs, 2)))

    async def _idle_once(self, session: ImapSession) -> bool:
        """One IDLE cycle, ended by a push, the keepalive or the 29-minute re-arm.

        True when the server pushed something; False when the cycle ran out (new
        mail the next pass finds anyway was then not pushed: see PushWatch)."""
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
            return True
        self.status.idling = True
        idle = asyncio.ensure_future(session.idle_wait(wait))
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({idle, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.status.idling = False
            kicked.cancel()
            if not idle.done():
                idle.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await idle
        arrived = idle.result() if not idle.cancelled() else False
        # DONE must be answered; a connection that died silently shows up here.
        await session.idle_done(self._probe_timeout)
        if arrived:
            self.push.pushed()
        elif not self._kick.is_set():
            await session.noop(self._probe_timeout)
        self.metrics.inc("imap.idle_cycles")
        return arrived or self._kick.is_set()  # a kick is no missed push

    # --- what to fetch ---

    async def _sync(
        self,
        session: ImapSession,
        info: SelectInfo,
        queue: asyncio.Queue[ChannelMessage],
    ) -> PassResult:
        uv = info.uidvalidity
        cursor = await self.store.get_cursor(self.mailbox)
        if cursor is None:
            # Before anything else: what arrives while the unseen mail is handled stays above.
            baseline = await self._baseline(session, info)
            if self.config.initial_sync == "unseen":
                unseen = await session.uid_search("UNSEEN")
                log_event(log, logging.INFO, "inbound.first_start", account=self.account,
                          folder=self.folder, mode="unseen", count=len(unseen))  # fmt: skip
                result = await self._handle(session, uv, unseen, queue, move_cursor=False)
                if not result.complete:
                    return result  # stopped before a message it must fetch again: no baseline yet
            else:
                log_event(log, logging.INFO, "inbound.first_start", account=self.account,
                          folder=self.folder, mode="new", baseline=baseline)  # fmt: skip
            await self._set_cursor(Cursor(uv, baseline))
            return DONE
        if cursor.uidvalidity != uv:
            return await self._rebaseline(session, info, cursor, queue)
        if cursor.last_uid < 0:
            cursor = await self._repair_cursor(session, info, cursor)
        uids = await session.uids_above(cursor.last_uid)
        if self._quiet_idle and uids:
            self.push.missed(session, len(uids))  # before the hand-on: counters first
            self.status.push_silent = self.push.silent
        self._quiet_idle = False
        result = await self._handle(session, uv, uids, queue)
        if time.time() - cursor.updated_at > 3600:
            # Keep "last synced" fresh: a later UIDVALIDITY change rechecks mail since then.
            await self._set_cursor(cursor)
        return result

    async def _baseline(self, session: ImapSession, info: SelectInfo) -> int:
        """The highest UID the folder had when selected (0 when empty): mail above it
        is new. From what the server really has, never from a missing UIDNEXT read as 0."""
        return await session.last_uid_at_select(self.wire_folder, info)

    async def _repair_cursor(self, session: ImapSession, info: SelectInfo, old: Cursor) -> Cursor:
        """A cursor of -1: written by releases up to 0.x on a first start against a
        server whose SELECT has no UIDNEXT (Courier). Every pass since then failed
        on ``UID 0:*``, so nothing was handed on after that first start.

        The mail that reached the server since the cursor was written (INTERNALDATE,
        with a few seconds of slack) is handed on now; older mail is not, as
        ``initial_sync="new"`` promised (``"unseen"`` handed its share on already, and
        the ledger drops anything handed on twice).
        """
        written = old.updated_at or time.time()
        since = time.strftime("%d-%b-%Y", time.gmtime(written - 86400))
        candidates = await session.uid_search("SINCE", since)
        dates = await session.internal_dates(candidates) if candidates else {}
        stalled = sorted(
            uid for uid, at in dates.items() if at >= written - CURSOR_REPAIR_SLACK_SECS
        )
        last = stalled[0] - 1 if stalled else await self._baseline(session, info)
        repaired = Cursor(old.uidvalidity, last, old.updated_at)
        await self._set_cursor(repaired)
        self.metrics.inc("imap.cursor_repairs")
        log_event(log, logging.WARNING, "inbound.cursor_repaired", account=self.account,
                  folder=self.folder, old=old.last_uid, new=last, stalled=len(stalled),
                  code="cursor_repaired")  # fmt: skip
        return repaired

    async def _rebaseline(
        self,
        session: ImapSession,
        info: SelectInfo,
        old: Cursor,
        queue: asyncio.Queue[ChannelMessage],
    ) -> PassResult:
        """UIDVALIDITY changed: our UIDs mean nothing now.

        Mail that arrived since the last sync (by date, with a day of slack for time
        zones) is looked at again; the ledger drops what was already handed on, so
        nothing is replayed and nothing that came in meanwhile is lost.
        """
        self.metrics.inc("imap.uidvalidity_changes")
        baseline = await self._baseline(session, info)
        since = time.gmtime((old.updated_at or time.time()) - 86400)
        date = time.strftime("%d-%b-%Y", since)
        uids = await session.uid_search("SINCE", date)
        log_event(log, logging.WARNING, "inbound.uidvalidity_changed", account=self.account,
                  folder=self.folder, old=old.uidvalidity, new=info.uidvalidity,
                  rechecked=len(uids), code="uidvalidity_changed")  # fmt: skip
        result = await self._handle(session, info.uidvalidity, uids, queue, move_cursor=False)
        if result.complete:
            await self._set_cursor(Cursor(info.uidvalidity, baseline))
        return result

    async def _set_cursor(self, cursor: Cursor) -> None:
        await self.writer.durable(
            functools.partial(self.store.set_cursor, self.mailbox, cursor, fence=self.writer.fence)
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
    ) -> PassResult:
        """Hand on ``uids`` in ascending order, in bounded windows.

        Stops early at a message it must fetch again (the cursor then sits just
        before that message, and a new pass follows after ``resync_in``).
        ``move_cursor=False`` (a first start, a re-baseline) writes ledger rows only.
        """
        uids = sorted(uids)
        window = self.config.fetch_batch_size * 10
        for start in range(0, len(uids), window):
            self.writer.begin(uv, move_cursor=move_cursor)
            result = await self._handle_window(session, uids[start : start + window], queue)
            if not result.complete:
                return result
        return DONE

    async def _handle_window(
        self, session: ImapSession, uids: list[int], queue: asyncio.Queue[ChannelMessage]
    ) -> PassResult:
        """Sizes, Message-IDs and senders first, then bodies: the next chunk downloads
        while this one is handed on.

        A duplicate is mail with the Message-ID AND the sender of mail already handed
        on (or waiting, deferred): refused mail never shadows a later allowed one.
        """
        meta = await session.fetch_meta(uids)
        hints = {uid: _hints(m.data) for uid, m in meta.items()}
        pairs = {uid: (mid, sender) for uid, (mid, sender) in hints.items() if mid}
        known = await self.store.handed_on(self.account, list(pairs.values()))
        steps = _plan(
            uids,
            meta,
            {uid for uid, pair in pairs.items() if pair in known},
            self.config.max_message_bytes,
            self.config.fetch_batch_size,
        )
        writer = self.writer
        ahead: asyncio.Task[dict[int, bytes]] | None = None
        result = DONE
        try:
            for i, step in enumerate(steps):
                if ahead is None:
                    ahead = asyncio.create_task(self._download(session, step, meta))
                data = await ahead
                ahead = None
                if i + 1 < len(steps):
                    ahead = asyncio.create_task(self._download(session, steps[i + 1], meta))
                result = await self._process_step(step, data, meta, hints, queue)
                if not result.complete:
                    break  # the serve loop syncs again, from the cursor
        finally:
            if ahead is not None:
                ahead.cancel()
            await to_completion(writer.flush(), writer.stop_retrying)
        if writer.delivered and self.config.handoff == "queue":
            await self._after_handoff(session, writer.delivered)
        return result

    async def _download(
        self, session: ImapSession, step: Step, meta: dict[int, FetchedMessage]
    ) -> dict[int, bytes]:
        if step.kind is StepKind.BODIES:
            expected = sum(meta[u].size or 0 for u in step.uids if u in meta)
            bodies = await session.fetch_bodies(step.uids, total_bytes=expected)
            self.metrics.inc("inbound.fetched", len(bodies))
            return bodies
        if step.kind is StepKind.OVERSIZED:
            return await session.fetch_headers(step.uids)
        return {}

    async def _process_step(
        self,
        step: Step,
        data: dict[int, bytes],
        meta: dict[int, FetchedMessage],
        hints: dict[int, tuple[str | None, str]],
        queue: asyncio.Queue[ChannelMessage],
    ) -> PassResult:
        writer = self.writer
        for uid in step.uids:
            header_id, sender = hints.get(uid, (None, ""))
            if step.kind is StepKind.DUPLICATE:
                writer.skip(uid, header_id or "")
                continue
            raw = data.pop(uid, None)  # ours alone: let go once judged (a 24 MB body)
            if raw is None:  # kind MISSING, or a FETCH answer that left it out
                retry_in = self._body_missing(uid, header_id)
                if retry_in is not None:
                    return PassResult(complete=False, resync_in=retry_in)
                continue
            self._missing.pop(uid, None)
            oversized = step.kind is StepKind.OVERSIZED
            size = meta[uid].size or 0
            # The message's identity, decided once: the header's Message-ID, else a
            # hash of the bytes. It is checked before the pipeline runs, so a copy
            # never counts against a limit or writes attachments.
            mid = message_identity(raw, header_id, oversized_size=size if oversized else None)
            if writer.seen_in_pass(mid, sender) or (
                header_id is None and await self.store.handed_on(self.account, [(mid, sender)])
            ):
                writer.skip(uid, mid)
                continue
            if oversized:
                outcome = await self._judge_oversized(uid, raw, size, mid)
            else:
                outcome = await self._judge(uid, raw, mid)
            del raw  # parsed: not held while the hand-off stores the message
            if outcome.decision == "deliver" and outcome.message is not None:
                message = outcome.message.model_copy(update=self._stamp)
                waiting = await self.deferred.judge(message, writer.key(uid))
                if waiting is None:
                    await writer.accept(uid, message, outcome.entry, queue)
                else:
                    stored = functools.partial(self.deferred.stored, waiting)
                    writer.defer(uid, message, outcome.entry, seq=waiting.seq,
                                 reason=waiting.reason, arrived_at=waiting.arrived_at,
                                 on_durable=stored)  # fmt: skip
            else:
                # A sender outside rollout_percent is left to people: recorded, not refused.
                kind = "quarantined" if outcome.decision == "quarantine" else "rejected"
                writer.record(uid, mid, kind, outcome.reason or kind,
                              sender=outcome.sender, subject=outcome.subject)  # fmt: skip
                if outcome.decision == "reject":
                    reason = outcome.reason or kind
                    self.reporter.rejected(
                        mid, outcome.sender, outcome.subject, reason, outcome.detail or ""
                    )
            self.status.last_uid = uid
        await writer.put_staged()  # one commit for the step's messages, then the puts
        return DONE

    def _body_missing(self, uid: int, header_id: str | None) -> float | None:
        """Never let the cursor pass a message we did not get: stop here and fetch it
        again, backing off (returns the delay). Expunged meanwhile, it is no longer
        listed and the next pass moves on; still listed after the give-up time, it is
        skipped with an error (returns None)."""
        misses, first = self._missing.get(uid, (0, time.monotonic()))
        misses += 1
        waited = time.monotonic() - first
        if misses < MISSING_BODY_RETRIES or waited < MISSING_GIVE_UP_SECS:
            self._missing[uid] = (misses, first)
            delay = float(min(MISSING_RETRY_BASE_SECS * 2 ** (misses - 1), 30.0))
            log_event(log, logging.WARNING, "inbound.fetch_incomplete", account=self.account,
                      folder=self.folder, uid=uid, message_id=header_id, misses=misses,
                      retry_in=f"{delay:.1f}s", code="fetch_incomplete")  # fmt: skip
            return delay
        self._missing.pop(uid, None)
        self.metrics.inc("inbound.errors")
        log_event(log, logging.ERROR, "inbound.body_missing", account=self.account,
                  folder=self.folder, uid=uid, message_id=header_id, tries=misses,
                  code="body_missing")  # fmt: skip
        return None

    async def _judge(self, uid: int, raw: bytes, mid: str, release: str | None = None) -> Outcome:
        try:
            return await self.pipeline.process(
                raw, arrival=time.time(), message_id=mid, release=release
            )
        except Exception as exc:  # bad mail must not stop the listener
            return self._pipeline_failed(exc, uid, mid)

    async def _judge_oversized(
        self, uid: int, header: bytes, size: int, mid: str, release: str | None = None
    ) -> Outcome:
        """Too big to download: only the header goes to the policy (accepted mail is
        handed on with a note instead of its body)."""
        self.metrics.inc("inbound.too_large")
        log_event(log, logging.WARNING, "inbound.too_large", account=self.account,
                  folder=self.folder, uid=uid, message_id=mid, size=size,
                  limit=self.config.max_message_bytes, code="too_large")  # fmt: skip
        try:
            return await self.pipeline.process_oversized(
                header, size, arrival=time.time(), message_id=mid, release=release
            )
        except Exception as exc:
            return self._pipeline_failed(exc, uid, mid)

    def _pipeline_failed(self, exc: Exception, uid: int, mid: str) -> Outcome:
        self.metrics.inc("inbound.errors")
        log_event(log, logging.ERROR, "inbound.pipeline_failed", exc=exc, account=self.account,
                  folder=self.folder, uid=uid, message_id=mid, code="pipeline_error")  # fmt: skip
        return Outcome("quarantine", mid, reason=f"pipeline_error:{type(exc).__name__}")

    # --- releases of quarantined mail (quarantine.py) ---

    def kick(self) -> None:
        """Look at the release requests now: ends an IDLE (or poll) wait early."""
        self._releases_due = True
        self._kick.set()

    async def _release_requested(
        self, session: ImapSession, uv: int, queue: asyncio.Queue[ChannelMessage]
    ) -> None:
        """Carry out the pending release requests of this mailbox, oldest first."""
        asked = [r for r in await self.store.pending_releases(self.account)
                 if r.key.folder == self.folder]  # fmt: skip
        if not asked:
            return
        writer = self.writer
        writer.begin(uv)
        try:
            for request in asked:
                await self._release(session, uv, request, queue)
        finally:
            await to_completion(writer.flush(), writer.stop_retrying)
        if writer.delivered and self.config.handoff == "queue":
            await self._after_handoff(session, writer.delivered)

    async def _release(
        self,
        session: ImapSession,
        uv: int,
        request: ReleaseRequest,
        queue: asyncio.Queue[ChannelMessage],
    ) -> None:
        """Fetch the released mail again and hand it on, unless the whole policy (less
        the quarantine decision released) refuses it now, or it is gone."""
        uid = request.key.uid
        if request.key.uidvalidity != uv:
            rebuilt = "the folder was rebuilt (UIDVALIDITY changed)"
            await self._release_failed(request, code="quarantine_gone", detail=rebuilt)
            return
        found = (await session.fetch_meta([uid])).get(uid)
        if found is None:
            if uid in await session.uid_search("UID", str(uid)):
                return  # listed but not fetched (a server syncing): the next pass asks again
            await self._release_failed(request, code="quarantine_gone",
                                       detail="it is no longer on the server")  # fmt: skip
            return
        header_id, sender = _hints(found.data)
        size = found.size or 0
        oversized = size > self.config.max_message_bytes
        if oversized:
            raw = (await session.fetch_headers([uid])).get(uid)
        else:
            raw = (await session.fetch_bodies([uid], total_bytes=size)).get(uid)
        if raw is None:
            return  # the next pass asks again
        mid = message_identity(raw, header_id, oversized_size=size if oversized else None)
        if self.writer.seen_in_pass(mid, sender) or await self.store.handed_on(
            self.account, [(mid, sender)]
        ):
            await self._release_failed(request, code="quarantine_already_released",
                                       detail="a copy of it was handed on already")  # fmt: skip
            return
        if oversized:
            outcome = await self._judge_oversized(uid, raw, size, mid, release=request.reason)
        else:
            outcome = await self._judge(uid, raw, mid, release=request.reason)
        del raw
        if outcome.decision != "deliver" or outcome.message is None:
            why = outcome.reason or outcome.decision
            if outcome.decision == "quarantine" and unreadable(outcome.reason):
                await self._release_failed(request, code="quarantine_unreadable",
                                           detail=f"it still cannot be read ({why})")  # fmt: skip
            else:
                await self._release_failed(request, code="quarantine_release_refused",
                                           detail=f"the policy refuses it ({why})")  # fmt: skip
            return
        message = outcome.message.model_copy(update=self._stamp)
        await self.writer.hand_on_quarantined(uid, message, outcome.entry, queue)
        self.deferred.counted(message.sender)
        self.metrics.inc("inbound.quarantine_released")
        log_event(log, logging.INFO, "inbound.quarantine_released", account=self.account,
                  folder=self.folder, uid=uid, message_id=message.id, sender=message.sender,
                  reason=request.reason)  # fmt: skip

    async def _release_failed(self, request: ReleaseRequest, *, code: str, detail: str) -> None:
        """The request failed for good (the mail stays quarantined; it may be asked again)."""
        await self.writer.durable(
            functools.partial(self.store.fail_release, request.key, code, detail)
        )
        self.metrics.inc("inbound.quarantine_release_failed")
        log_event(log, logging.WARNING, "inbound.quarantine_release_failed",
                  account=self.account, folder=self.folder, uid=request.key.uid,
                  message_id=request.message_id, reason=request.reason, code=code,
                  detail=detail)  # fmt: skip

    async def _after_handoff(self, session: ImapSession, uids: list[int]) -> None:
        """Optional ``\\Seen`` / move, for handled mail only (rejected mail stays as it was).

        Handled: on the queue (``handoff="queue"``), or acknowledged (``"ack"``; then
        at the end of the next pass, in this run: a message acked after its run ended
        stays as it is on the server).
        """
        try:
            if self.config.mark_seen:
                await session.store_flags(uids, "(\\Seen)")
            if self.config.move_to_folder:
                target = await session.resolve_folder(self.config.move_to_folder)
                await session.move(uids, target)
                self.metrics.inc("inbound.moved", len(uids))
        except TransportError:
            raise
        except ChannelError as exc:
            # The messages are handed on and recorded; only the tidy-up failed.
            self.metrics.inc("inbound.errors")
            log_event(log, logging.WARNING, "inbound.after_handoff_failed", exc=exc,
                      account=self.account, folder=self.folder, uid=uid_list(uids))  # fmt: skip


def _plan(
    uids: list[int],
    meta: dict[int, FetchedMessage],
    duplicates: set[int],
    max_bytes: int,
    batch_size: int,
) -> list[Step]:
    """Split UIDs, in order, into body fetches (bounded in count and bytes) and single steps."""
    steps: list[Step] = []
    pending: list[int] = []
    pending_bytes = 0
    for uid in uids:
        m = meta.get(uid)
        if m is None:  # expunged since SEARCH, or left out: find out by asking again
            if pending:
                steps.append(Step(StepKind.BODIES, pending))
                pending, pending_bytes = [], 0
            steps.append(Step(StepKind.MISSING, [uid]))
            continue
        size = m.size or 0
        kind = StepKind.BODIES
        if uid in duplicates:
            kind = StepKind.DUPLICATE
        elif size > max_bytes:
            kind = StepKind.OVERSIZED
        full = len(pending) >= batch_size or pending_bytes + size > FETCH_BYTES_BUDGET
        if pending and (kind is not StepKind.BODIES or full):
            steps.append(Step(StepKind.BODIES, pending))
            pending, pending_bytes = [], 0
        if kind is StepKind.BODIES:
            pending.append(uid)
            pending_bytes += size
        else:
            steps.append(Step(kind, [uid]))
    if pending:
        steps.append(Step(StepKind.BODIES, pending))
    return steps


def uid_list(uids: list[int]) -> str:
    return ",".join(map(str, uids[:20])) + ("..." if len(uids) > 20 else "")


def _hints(block: bytes | None) -> tuple[str | None, str]:
    """(Message-ID, sender) from the Message-ID/From block, read as the pipeline reads
    them (the same functions), so the duplicate check and the pipeline agree."""
    if not block:
        return None, ""
    headers = Headers.from_block(block)
    return header_message_id(headers.get("message-id")), sender_of(headers)[1]


async def _close(session: ImapSession) -> None:
    if session.is_open:
        await session.logout()
    else:
        session.abort()
