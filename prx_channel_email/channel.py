"""EmailChannel: the adapter a framework uses. It wires the two one-way flows.

Inbound:  IMAP (sync.py) -> parse/normalize + policy (inbound.py) -> the framework's queue.
Outbound: SendMessage -> compose + outbox (outbox.py) -> SMTP.
Both share one storage (_storage), one hand-off ledger (_handoff/ledger.py: a reply
acks its parent there) and one set of counters.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from types import TracebackType
from typing import TYPE_CHECKING

from prx_channel_email._handoff.ledger import HandoffLedger
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._inbound.sync import SyncEngine, SyncStatus
from prx_channel_email._net.imap import open_session
from prx_channel_email._net.smtp import SmtpTransport
from prx_channel_email._oauth.tokens import TokenManager, TokenProvider, auth_backoff, token_manager
from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage import open_storage
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email._tools import MailboxTools, ToolAccount
from prx_channel_email.config import DEFAULT_ACCOUNT, EmailConfig, sender_entry
from prx_channel_email.errors import ChannelError, SendError, StorageError
from prx_channel_email.models import Channel, ChannelMessage, SendMessage
from prx_channel_email.status import (
    ChannelStatus,
    MailboxStatus,
    RejectedCallback,
    StatusCallback,
    StatusReporter,
    failure_code,
    is_permanent,
)

if TYPE_CHECKING:
    from prx_channel_email._ops.endpoint import OpsEndpoint
    from prx_channel_email._ops.prometheus import CounterSet

log = logging.getLogger(__name__)

# How long close() waits for a cancelled listen() to finish its last ledger write.
LISTENER_STOP_SECS = 15.0


class EmailChannel(Channel):
    """An email account as a channel: IMAP IDLE in, threaded SMTP replies out.

    Use as an async context manager, or call :meth:`start` and :meth:`close`.
    ``listen()`` and ``send()`` start it on first use.
    """

    name = "email"

    def __init__(
        self,
        config: EmailConfig,
        *,
        token_provider: TokenProvider | None = None,
        on_status: StatusCallback | None = None,
        on_rejected: RejectedCallback | None = None,
    ) -> None:
        """``on_status`` is called (sync or async) with a :class:`ChannelStatus` on every
        change of state: connected, reconnecting, failed (with its code), closed.
        ``on_rejected`` is called with a :class:`RejectedMessage` for each refused mail.
        ``token_provider``: an async callable returning (access token, expiry), asked
        before every login, for hosts that manage OAuth tokens themselves."""
        # OAuth: one token manager for IMAP, SMTP and the Sent copy, handed to each.
        self.tokens: TokenManager | None
        config, self.tokens = token_manager(config, token_provider)
        self.config = config
        self.metrics = Metrics()
        self.reporter = StatusReporter(config.account, on_status, on_rejected, metrics=self.metrics)
        self.store = open_storage(config.state_dir)
        # One hand-off ledger: the host's acks and replies settle received mail there.
        self.ledger = HandoffLedger(self.store, config.account, handoff=config.handoff)
        self.pipeline = InboundPipeline(config, metrics=self.metrics)
        self.sync = SyncEngine(
            config,
            self.store,
            self.pipeline,
            self.metrics,
            reporter=self.reporter,
            auth_backoff=auth_backoff(self.tokens),
            session_factory=functools.partial(open_session, tokens=self.tokens),
            ledger=self.ledger,
        )
        self.outbox = Outbox(
            config, self.store, self.metrics, tokens=self.tokens, ledger=self.ledger
        )
        self._started = False
        self._start_lock = asyncio.Lock()
        self._listeners: set[asyncio.Task[object]] = set()
        self._smtp_check: asyncio.Task[None] | None = None
        self._ops: OpsEndpoint | None = None
        self._tools: MailboxTools | None = None

    @property
    def tools(self) -> MailboxTools:
        """The mailbox tools for the agent: search, read, thread and attachment text,
        showing only mail this channel would hand on (``tools_scope``); writes only with
        ``tools_write``. They use their own IMAP session, opened on demand."""
        if self._tools is None:
            self._tools = MailboxTools(
                [ToolAccount("default", self.config, self.pipeline, self.tokens)],
                send=self.send_message,
                prepare=self.start,
            )
        return self._tools

    async def start(self) -> EmailChannel:
        async with self._start_lock:
            if not self._started:
                await self.store.open()
                await self._apply_runtime_senders()
                await self.outbox.start()
                try:
                    await self._start_ops()
                except BaseException:
                    await self.outbox.close()
                    await self.store.close()
                    raise
                self._started = True
        return self

    async def _start_ops(self) -> None:
        """Serve ``/metrics``, ``/healthz`` and ``/status`` when ``metrics_port`` is set.

        A port that cannot be bound fails the start: monitoring that silently is
        not there is worse than a clear error at start-up."""
        port, host = self.config.metrics_port, self.config.metrics_host
        if not port:
            return
        from prx_channel_email._ops.endpoint import OpsEndpoint  # prometheus_client: only now

        ops = OpsEndpoint(self.mailboxes, self._counter_sets, self._outbox_pending)
        try:
            await ops.start(host, port)
        except OSError as exc:
            raise ChannelError(
                f"cannot serve the operations endpoint on {host}:{port}: {exc.strerror or exc}",
                code="metrics_bind_failed",
            ) from None
        self._ops = ops
        log_event(log, logging.INFO, "ops.listening", host=host, port=ops.port)

    @property
    def metrics_port(self) -> int | None:
        """The port the operations endpoint listens on (None when it is off)."""
        return self._ops.port if self._ops is not None else None

    def _counter_sets(self) -> list[CounterSet]:
        from prx_channel_email._ops.prometheus import CounterSet

        return [CounterSet(DEFAULT_ACCOUNT, self.sync.folder, self.metrics.snapshot())]

    async def _outbox_pending(self) -> dict[str, int]:
        """Unsent rows per account, for ``/metrics`` (left out while the state is unreadable)."""
        try:
            return {DEFAULT_ACCOUNT: await self.outbox.pending()}
        except StorageError:
            return {}

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
        try:
            await self.start()
        except ChannelError as exc:  # e.g. the state store cannot be opened
            self.reporter.imap_failed(exc, None, permanent=True)
            raise
        if self._smtp_check is None:
            self._smtp_check = asyncio.create_task(self._check_smtp())
        task = asyncio.current_task()
        if task is not None:
            self._listeners.add(task)
        try:
            await self.sync.run(queue)
        finally:
            if task is not None:
                self._listeners.discard(task)

    async def send(self, message: SendMessage) -> None:
        await self.send_message(message)

    async def send_message(self, message: SendMessage) -> str:
        """Like :meth:`send`, but returns the Message-ID of the sent mail."""
        await self.start()
        try:
            return await self.outbox.send(message)
        except SendError as exc:
            if is_permanent(exc):  # a refused login, not a refused recipient: the status shows it
                self.reporter.smtp_failed(exc, None)
                if self._listeners and (self._smtp_check is None or self._smtp_check.done()):
                    # Check again (slowly) so the status turns back once it is fixed.
                    self._smtp_check = asyncio.create_task(self._check_smtp(after=True))
            raise

    async def ack(self, message: ChannelMessage) -> None:
        """``handoff="ack"``: the host is done with ``message``; returns once that is on disk.

        It is then never handed on again (not even after a restart), and the optional
        ``mark_seen`` / ``move_to_folder`` apply to it at the end of the next sync pass.
        A reply to it (``send(message.reply(...))``) acks it too. With
        ``handoff="queue"`` a message is handled once on the queue: this does nothing.
        Raises StorageError (a ChannelError) when the state cannot be written.
        """
        await self.start()
        await self.ledger.ack(message)

    @property
    def allowed_senders(self) -> list[str]:
        """The allow-list in effect: the config's, with the host's runtime changes."""
        return list(self.pipeline.policy.allowed_senders)

    async def allow_sender(self, entry: str) -> None:
        """Allow ``entry`` (an address, ``@domain`` or ``*``) from now on, and after a
        restart: the change is on disk before this returns. Mail already refused
        stays refused; the sender's next mail is handed on."""
        await self._change_sender(entry, allow=True)

    async def remove_sender(self, entry: str) -> None:
        """Take ``entry`` off the allow-list (also an entry of the config's list), from
        now on and after a restart. Only that entry: removing ``bob@x.org`` does not
        refuse bob while ``@x.org`` is allowed."""
        await self._change_sender(entry, allow=False)

    async def _change_sender(self, entry: str, *, allow: bool) -> None:
        item = sender_entry(entry) if isinstance(entry, str) else None
        if item is None:
            raise ChannelError(
                f"{entry!r} is neither an address, '@domain' nor '*'", code="invalid_argument"
            )
        await self.start()
        account, in_config = self.config.account, item in self.config.allowed_senders
        await self.store.change_sender(account, item, allow=allow, in_config=in_config)
        await self._apply_runtime_senders()
        event = "channel.sender_allowed" if allow else "channel.sender_removed"
        log_event(log, logging.INFO, event, account=account, sender=item)

    async def _apply_runtime_senders(self) -> None:
        changes = await self.store.runtime_senders(self.config.account)
        self.pipeline.policy.set_runtime_senders(changes.added, changes.removed)

    async def wait_ready(self, timeout: float) -> ChannelStatus:  # noqa: ASYNC109 (the contract)
        """While :meth:`listen` runs: return once IMAP is logged in with the folder
        selected and the SMTP login was checked. A permanent failure (``auth_failed``,
        ``tls_verify_failed``, ``folder_missing``, ``oauth_reauth_required`` ...) raises
        a ChannelError with that code at once; ``timeout`` seconds without either
        raise NotReadyError (code ``timeout``, also a TimeoutError)."""
        return await self.reporter.wait_ready(timeout)

    @property
    def state(self) -> ChannelStatus:
        """The current :class:`ChannelStatus` (what ``on_status`` was last called with)."""
        return self.reporter.current

    def mailboxes(self) -> list[MailboxStatus]:
        """One :class:`MailboxStatus` per mailbox (account, folder) this channel serves:
        a snapshot, cheap enough for a status page or a health probe to call often."""
        status, sync = self.reporter.current, self.sync
        return [
            MailboxStatus(
                account=DEFAULT_ACCOUNT,
                folder=sync.folder,
                state=status.state,
                code=status.code,
                message=status.message,
                idling=sync.status.idling,
                last_message_at=sync.writer.last_handed_on_at,
                last_sync_at=sync.status.last_sync_at,
            )
        ]

    @property
    def status(self) -> SyncStatus:
        """The IMAP side in detail (mode, cursor, last error): diagnostics."""
        return self.sync.status

    def stats(self) -> dict[str, int]:
        """Counters: connects, reconnects by cause, IDLE cycles, fetched, delivered, skipped..."""
        return self.metrics.snapshot()

    async def health_check(self) -> bool:
        """True unless authentication failed, the state cannot be written (the hand-off
        is paused), the outbox cannot reach its server or OAuth needs a new sign-in."""
        return (
            self._started
            and not self.sync.status.auth_failed
            and self.sync.status.storage_error is None
            and self.outbox.healthy
            and not (self.tokens is not None and self.tokens.reauth_required)
        )

    async def close(self) -> None:
        """Stop listening (a ledger write in flight completes), stop the outbox, close the store."""
        if self._smtp_check is not None:
            self._smtp_check.cancel()
            self._smtp_check = None
        await self._stop_listeners()
        if self._tools is not None:
            await self._tools.close()
        self.reporter.closed()
        async with self._start_lock:
            if self._started:
                self._started = False
                if self._ops is not None:
                    await self._ops.close()
                    self._ops = None
                await self.outbox.close()
                await self.store.close()

    async def _check_smtp(self, *, after: bool = False) -> None:
        """Log in to SMTP once, so readiness covers replies too; retried until it passes
        (slowly after a permanent failure: the server side may get fixed). ``after``:
        a send just failed to log in, so wait before the first try."""
        transient = Backoff(base=1.0, cap=300.0)
        permanent = auth_backoff(self.tokens, base=300.0)  # quick again after `auth login`
        if after:
            await asyncio.sleep(permanent.next())
        while True:
            try:
                await SmtpTransport(self.config, self.metrics, tokens=self.tokens).check_login()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # SmtpFailure, or a bug: neither may end the check
                lasting = is_permanent(exc)
                delay = (permanent if lasting else transient).next()
                self.reporter.smtp_failed(exc, delay)
                log_event(log, logging.ERROR if lasting else logging.WARNING,
                          "smtp.check_failed", exc=exc, account=self.config.account,
                          code=failure_code(exc), retry_in=f"{delay:.1f}s")  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self.reporter.smtp_ready()
            return

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
