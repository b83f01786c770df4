"""EmailChannel: the adapter a framework uses. It wires the two one-way flows.

Inbound:  IMAP (sync.py) -> parse/normalize + policy (inbound.py) -> the framework's queue.
Outbound: SendMessage -> compose + outbox (outbox.py) -> SMTP.

One channel serves one account or many (``EmailChannel(load_accounts())``), each
with several folders. Shared by all: one state store (one database thread), one
event loop, one set of counters and one login gate per IMAP server. Per account
(:class:`_Account`): its tokens, policy, outbox and SMTP identity. Per mailbox
(account, folder): its own sync engine, so its own IMAP session, cursor, backoff
and status. Mailboxes are coroutines, not threads: a thousand cost a thousand
sessions' buffers, and nothing else grows with their number. The hand-off ledger
(_handoff/ledger.py) is per account: a reply acks its parent there, whichever
folder the parent came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from prx_channel_email._handoff.ledger import HandoffLedger
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._inbound.quarantine import (
    parse_release_id,
    release_id,
    request_release,
    wait_released,
)
from prx_channel_email._inbound.sync import SyncEngine, SyncStatus
from prx_channel_email._net.imap import open_session
from prx_channel_email._net.logins import LoginGate
from prx_channel_email._net.smtp import SmtpTransport
from prx_channel_email._oauth.tokens import TokenManager, TokenProvider, auth_backoff, token_manager
from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage import LeaseLost, QuarantinedMail, Storage, storage_of
from prx_channel_email._storage.postgres.keeper import LeaseKeeper
from prx_channel_email._storage.postgres.leases import Lease, LeaseTable
from prx_channel_email._storage.postgres.store import PostgresStore
from prx_channel_email._support.backoff import Backoff
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email._tools import MailboxTools, ToolAccount
from prx_channel_email.config import (
    DEFAULT_ACCOUNT,
    SERVICE_FIELDS,
    EmailConfig,
    same_login_problems,
    sender_entry,
)
from prx_channel_email.errors import (
    ChannelError,
    ConfigError,
    NotReadyError,
    SendError,
    StorageError,
)
from prx_channel_email.models import Channel, ChannelMessage, QuarantinedMessage, SendMessage
from prx_channel_email.status import (
    ChannelState,
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
# How often a listening channel looks for release requests made by another process
# (`prx-email quarantine release`): one small read of the state for all accounts.
RELEASE_POLL_SECS = 2.0


class _Account:
    """One account of the channel: its tokens, policy, outbox and SMTP login check,
    and one sync engine (a mailbox) per folder it watches."""

    def __init__(
        self,
        name: str,
        config: EmailConfig,
        store: Storage,
        metrics: Metrics,
        gate: LoginGate,
        *,
        token_provider: TokenProvider | None,
        on_status: StatusCallback | None,
        on_rejected: RejectedCallback | None,
    ) -> None:
        self.name = name
        # OAuth: one token manager for IMAP, SMTP and the Sent copy rides on the config.
        self.tokens: TokenManager | None
        config, self.tokens = token_manager(config, token_provider)
        self.config = config
        # The account's own counters (policy, outbox, SMTP); each mailbox has its own.
        # Both roll up into the channel's totals (``metrics``).
        self.metrics = Metrics(parent=metrics)
        self.store = store
        self.pipeline = InboundPipeline(config, metrics=self.metrics)
        # One hand-off ledger: the host's acks and replies settle received mail there.
        self.ledger = HandoffLedger(store, config.account, handoff=config.handoff)
        self.outbox = Outbox(config, store, self.metrics, tokens=self.tokens, ledger=self.ledger)
        folders = config.imap_folders if "receive" in config.capabilities else []
        self.engines: dict[str, SyncEngine] = {}
        for folder in folders:
            counters = Metrics(parent=metrics)
            reporter = StatusReporter(
                config.account, on_status, on_rejected, metrics=counters, name=name, folder=folder
            )
            self.engines[folder] = SyncEngine(
                config,
                store,
                self.pipeline,
                counters,
                reporter=reporter,
                auth_backoff=auth_backoff(self.tokens),
                session_factory=gate.opener(functools.partial(open_session, tokens=self.tokens)),
                ledger=self.ledger,
                folder=folder,
                name=name,
            )
        if self.engines:
            self.reporters = [e.reporter for e in self.engines.values()]
        else:  # a send-only account: ready once its SMTP login is
            reporter = StatusReporter(
                config.account, on_status, on_rejected, metrics=self.metrics, name=name
            )
            reporter.imap_ready()
            self.reporters = [reporter]
        self.smtp_check: asyncio.Task[None] | None = None

    # --- SMTP readiness (one login check per account, reported to each of its mailboxes) ---

    def smtp_ready(self) -> None:
        for reporter in self.reporters:
            reporter.smtp_ready()

    def smtp_failed(self, exc: BaseException, retry_in: float | None) -> None:
        for reporter in self.reporters:
            reporter.smtp_failed(exc, retry_in)

    def start_smtp_check(self, *, after: bool = False) -> None:
        if self.smtp_check is None or (after and self.smtp_check.done()):
            self.smtp_check = asyncio.create_task(self._check_smtp(after=after))

    def stop_smtp_check(self) -> None:
        if self.smtp_check is not None:
            self.smtp_check.cancel()
            self.smtp_check = None

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
                self.smtp_failed(exc, delay)
                log_event(log, logging.ERROR if lasting else logging.WARNING,
                          "smtp.check_failed", exc=exc, account=self.config.account,
                          code=failure_code(exc), retry_in=f"{delay:.1f}s")  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self.smtp_ready()
            return

    # --- the hand-off ---

    async def apply_runtime_senders(self) -> None:
        changes = await self.store.runtime_senders(self.config.account)
        self.pipeline.policy.set_runtime_senders(changes.added, changes.removed)

    def healthy(self) -> bool:
        return (
            not any(e.status.auth_failed for e in self.engines.values())
            and all(e.status.storage_error is None for e in self.engines.values())
            and self.outbox.healthy
            and not (self.tokens is not None and self.tokens.reauth_required)
        )


class EmailChannel(Channel):
    """Email accounts as a channel: IMAP IDLE in, threaded SMTP replies out.

    ``EmailChannel(config)`` serves one account (named "default");
    ``EmailChannel(load_accounts())`` serves every account of the mapping, each
    folder of each a mailbox of its own. Use as an async context manager, or call
    :meth:`start` and :meth:`close`. ``listen()`` and ``send()`` start it on first use.
    """

    name = "email"

    def __init__(
        self,
        config: EmailConfig | Mapping[str, EmailConfig],
        *,
        token_provider: TokenProvider | None = None,
        on_status: StatusCallback | None = None,
        on_rejected: RejectedCallback | None = None,
    ) -> None:
        """``on_status`` is called (sync or async) with a :class:`ChannelStatus` on every
        change of a mailbox's state (its ``account`` and ``folder`` say which):
        connected, reconnecting, failed (with its code), closed. ``on_rejected`` is
        called with a :class:`RejectedMessage` for each refused mail.
        ``token_provider``: an async callable returning (access token, expiry), asked
        before every login, for hosts that manage OAuth tokens themselves (one account
        only: it cannot tell accounts apart)."""
        configs = {DEFAULT_ACCOUNT: config} if isinstance(config, EmailConfig) else dict(config)
        _check_accounts(configs, token_provider)
        first = next(iter(configs.values()))
        self.metrics = Metrics()
        self.store = storage_of(first)
        # Replicas sharing the state (state_url): each mailbox is served under a lease.
        self.replica_id = first.replica_id
        self.lease_secs = first.lease_secs
        self._keeper: LeaseKeeper | None = None
        self.logins = LoginGate(first.max_concurrent_logins)
        self.accounts: dict[str, _Account] = {
            name: _Account(
                name,
                cfg,
                self.store,
                self.metrics,
                self.logins,
                token_provider=token_provider,
                on_status=on_status,
                on_rejected=on_rejected,
            )
            for name, cfg in configs.items()
        }
        self._first = next(iter(self.accounts.values()))
        self._started = False
        self._start_lock = asyncio.Lock()
        self._listeners: set[asyncio.Task[object]] = set()
        self._tools: MailboxTools | None = None
        self._ops: OpsEndpoint | None = None

    @property
    def tools(self) -> MailboxTools:
        """The mailbox tools for the agent, over every account: search, read, thread and
        attachment text, showing only mail this channel would hand on (``tools_scope``);
        writes only with ``tools_write``. They use their own IMAP sessions, opened on
        demand."""
        if self._tools is None:
            self._tools = MailboxTools(
                [
                    ToolAccount(a.name, a.config, a.pipeline, a.tokens)
                    for a in self.accounts.values()
                ],
                send=self.send_message,
                prepare=self.start,
            )
        return self._tools

    # --- the first account, as the single-account API always had it ---

    @property
    def config(self) -> EmailConfig:
        """The (first) account's settings."""
        return self._first.config

    @property
    def tokens(self) -> TokenManager | None:
        return self._first.tokens

    @property
    def pipeline(self) -> InboundPipeline:
        return self._first.pipeline

    @property
    def outbox(self) -> Outbox:
        return self._first.outbox

    @property
    def sync(self) -> SyncEngine:
        """The first mailbox's sync engine (diagnostics and tests)."""
        engines = self._first.engines
        if not engines:
            raise ChannelError("the first account receives no mail", code="invalid_argument")
        return next(iter(engines.values()))

    @property
    def reporter(self) -> StatusReporter:
        return self._first.reporters[0]

    # --- lifecycle ---

    async def start(self) -> EmailChannel:
        async with self._start_lock:
            if not self._started:
                await self.store.open()
                try:
                    for account in self.accounts.values():
                        await account.apply_runtime_senders()
                        await account.outbox.start()
                    await self._start_ops()
                except BaseException:
                    for account in self.accounts.values():
                        await account.outbox.close()
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

        return [CounterSet(account, folder, counts) for account, folder, counts in self.counters()]

    async def _outbox_pending(self) -> dict[str, int]:
        """Unsent rows per account, for ``/metrics`` (an account whose state cannot be
        read is left out)."""
        pending: dict[str, int] = {}
        for account in self.accounts.values():
            with contextlib.suppress(StorageError):
                pending[account.name] = await account.outbox.pending()
        return pending

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
        """Serve every mailbox of every account onto ``queue`` until cancelled."""
        try:
            await self.start()
        except ChannelError as exc:  # e.g. the state store cannot be opened
            for account in self.accounts.values():
                for reporter in account.reporters:
                    reporter.imap_failed(exc, None, permanent=True)
            raise
        for account in self.accounts.values():
            account.start_smtp_check()
        task = asyncio.current_task()
        if task is not None:
            self._listeners.add(task)
        watcher = asyncio.create_task(self._watch_releases())
        try:
            await self._serve(queue)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if task is not None:
                self._listeners.discard(task)

    async def _serve(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        if isinstance(self.store, PostgresStore):
            await self._serve_leased(queue)
            return
        mailboxes = [
            asyncio.create_task(_serve_mailbox(account, engine, queue))
            for account in self.accounts.values()
            for engine in account.engines.values()
        ]
        try:
            if mailboxes:
                await asyncio.gather(*mailboxes)
            else:  # send-only accounts: nothing to listen to, but listen() runs on
                await asyncio.Event().wait()
        finally:
            for mailbox in mailboxes:
                mailbox.cancel()
            if mailboxes:
                await asyncio.gather(*mailboxes, return_exceptions=True)

    async def _watch_releases(self) -> None:
        """Kick the mailboxes that have release requests waiting (made by the CLI in
        another process; the API kicks at once). A mailbox served elsewhere (another
        replica) is no one's here: its own listener carries the request out."""
        by_name = {a.config.account: a for a in self.accounts.values()}
        while True:
            await asyncio.sleep(RELEASE_POLL_SECS)
            try:  # one read for all accounts: a thousand mailboxes idle as cheaply as one
                asked = await self.store.pending_releases()
            except StorageError:
                continue  # the mailboxes report the state's trouble themselves
            for account_name, folder in {(r.key.account, r.key.folder) for r in asked}:
                account = by_name.get(account_name)
                engine = account.engines.get(folder) if account is not None else None
                if engine is not None:
                    engine.kick()

    async def _serve_leased(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        """Serve the mailboxes whose lease this replica holds, until cancelled.

        The lease keeper takes this replica's share and tells it when to start a
        mailbox (its writes then carry the lease's epoch) and when to stop one (the
        mailbox's task is cancelled: it leaves IDLE and closes its session). A write
        refused for a lost lease stops the mailbox the same way.
        """
        assert isinstance(self.store, PostgresStore)
        # Leases are keyed like the state (the account's state key, the folder).
        engines = {(a.config.account, f): (a, e) for a in self.accounts.values()
                   for f, e in a.engines.items()}  # fmt: skip
        tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

        async def serve(account: _Account, engine: SyncEngine, lease: Lease) -> None:
            try:
                await _serve_mailbox(account, engine, queue)
            except LeaseLost:
                await keeper.lost(lease)

        async def gain(lease: Lease) -> None:
            account, engine = engines[lease.mailbox]
            engine.serve_under(lease.epoch)
            tasks[lease.mailbox] = asyncio.create_task(serve(account, engine, lease))

        async def loss(lease: Lease) -> None:
            served = tasks.pop(lease.mailbox, None)
            if served is not None and served is not asyncio.current_task():
                served.cancel()
                await asyncio.wait({served}, timeout=LISTENER_STOP_SECS)

        keeper = LeaseKeeper(
            LeaseTable(self.store.pool, lease_secs=self.lease_secs),
            self.replica_id,
            list(engines),
            on_gain=gain,
            on_loss=loss,
        )
        self._keeper = keeper
        try:
            await keeper.run()
        finally:
            for served in tasks.values():
                served.cancel()
            if tasks:
                await asyncio.wait(set(tasks.values()), timeout=LISTENER_STOP_SECS)
            tasks.clear()
            # A clean stop hands the mailboxes over at once (bounded: a lost database
            # must not hold the stop up; the leases then run out by themselves).
            await asyncio.shield(keeper.leave())
            self._keeper = None

    async def _first_tick(self, within: float) -> LeaseKeeper:
        """The lease keeper once it took this replica's first share."""
        deadline = time.monotonic() + within
        while self._keeper is None or not self._keeper.ticked.is_set():
            if time.monotonic() > deadline:
                raise NotReadyError(
                    f"no mailbox lease taken within {within:g} s (is the database reachable?)"
                )
            if self._keeper is None:
                await asyncio.sleep(0.05)  # listen() has not started the keeper yet
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._keeper.ticked.wait(), deadline - time.monotonic())
        return self._keeper

    async def close(self) -> None:
        """Stop listening (a ledger write in flight completes), stop the outboxes, close
        the store."""
        for account in self.accounts.values():
            account.stop_smtp_check()
        await self._stop_listeners()
        if self._tools is not None:
            await self._tools.close()
        for account in self.accounts.values():
            for reporter in account.reporters:
                reporter.closed()
        async with self._start_lock:
            if self._started:
                self._started = False
                for account in self.accounts.values():
                    await account.outbox.close()
                await self.store.close()
                if self._ops is not None:
                    await self._ops.close()
                    self._ops = None

    # --- sending ---

    async def send(self, message: SendMessage) -> None:
        await self.send_message(message)

    async def send_message(self, message: SendMessage) -> str:
        """Like :meth:`send`, but returns the Message-ID of the sent mail.

        It leaves through ``message.account``; when unset, through the account that
        received the parent (``in_reply_to``, ``thread_ts``, else the latest mail from
        the recipient), or the only account. Several accounts and no way to tell:
        SendError ``account_required``."""
        await self.start()
        account = await self._sending_account(message)
        try:
            return await account.outbox.send(message)
        except SendError as exc:
            exc.account = account.name
            if is_permanent(exc):  # a refused login, not a refused recipient: the status shows it
                account.smtp_failed(exc, None)
                if self._listeners:  # check again (slowly) so the status turns back once fixed
                    account.start_smtp_check(after=True)
            raise

    async def _sending_account(self, message: SendMessage) -> _Account:
        if message.account is not None:
            found = self.accounts.get(message.account)
            if found is None:
                raise SendError(
                    f"no account named {message.account!r} (accounts: {', '.join(self.accounts)})",
                    code="account_unknown",
                    recipient=message.recipient,
                )
            return found
        if len(self.accounts) == 1:
            return self._first
        best: tuple[float, _Account] | None = None
        for account in self.accounts.values():
            try:
                entry = await account.outbox.parent_entry(message)
            except StorageError as exc:
                exc.account = account.name
                raise
            if entry is not None and (best is None or entry.received_at > best[0]):
                best = (entry.received_at, account)
        if best is None:
            raise SendError(
                "several accounts could send this and none received its parent:"
                " set SendMessage.account",
                code="account_required",
                recipient=message.recipient,
            )
        return best[1]

    async def ack(self, message: ChannelMessage) -> None:
        """``handoff="ack"``: the host is done with ``message``; returns once that is on disk.

        It is then never handed on again (not even after a restart), and the optional
        ``mark_seen`` / ``move_to_folder`` apply to it at the end of the next sync pass.
        A reply to it (``send(message.reply(...))``) acks it too. With
        ``handoff="queue"`` a message is handled once on the queue: this does nothing.
        Raises StorageError (a ChannelError) when the state cannot be written.
        """
        await self.start()
        account = self._account_of(message.account)
        try:
            await account.ledger.ack(message)
        except ChannelError as exc:
            exc.account = account.name
            raise

    def _account_of(self, name: str | None) -> _Account:
        found = self.accounts.get(name) if name is not None else None
        if found is not None:
            return found
        if name is None or len(self.accounts) == 1:  # e.g. a message of an older run
            return self._first
        raise ChannelError(
            f"no account named {name!r} (accounts: {', '.join(self.accounts)})",
            code="account_unknown",
        )

    # --- quarantined mail ---

    async def quarantined(
        self, *, account: str | None = None, limit: int = 100
    ) -> list[QuarantinedMessage]:
        """Mail the policy quarantined (newest first, per account): sender, subject,
        reason and when; ``prx-email quarantine list`` shows the same."""
        await self.start()
        targets = [self._account_of(account)] if account is not None else self.accounts.values()
        found: list[QuarantinedMessage] = []
        for target in targets:
            found += await quarantined_messages(self.store, target.config.account, limit)
        return found

    async def release_quarantined(
        self,
        id: str,
        *,
        account: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109
    ) -> None:
        """Hand the quarantined mail ``id`` (:attr:`QuarantinedMessage.id`) on, once.

        The request is durable before anything else happens; the listener serving the
        mail's mailbox fetches it again, runs the whole policy with only the decision
        that quarantined it set aside (never the allow-list or sender authentication)
        and puts it on the queue like any mail (in flight, acked, redelivered after a
        crash). Returns once it is on the queue. A ChannelError says why not:
        ``quarantine_unknown``, ``quarantine_already_released``,
        ``quarantine_not_releasable``, ``quarantine_gone``,
        ``quarantine_release_refused``, ``quarantine_unreadable``, or
        ``quarantine_release_pending`` when no listener carried it out within
        ``timeout`` seconds (not listening: at once); the request then stays and is
        carried out when the mailbox is served.
        """
        await self.start()
        targets = [self._account_of(account)] if account is not None else self.accounts.values()
        error: ChannelError | None = None
        for target in targets:
            key = parse_release_id(target.config.account, id)
            try:
                await request_release(self.store, key, id)
            except ChannelError as exc:
                exc.account = target.name
                if exc.code != "quarantine_unknown":
                    raise
                error = error or exc
                continue
            engine = target.engines.get(key.folder)
            if engine is not None:
                engine.kick()
            within = timeout if self._listeners else 0.0
            try:
                await wait_released(self.store, key, id, within)
            except ChannelError as exc:
                exc.account = target.name
                raise
            return
        assert error is not None
        raise error

    # --- the allow-list ---

    @property
    def allowed_senders(self) -> list[str]:
        """The (first) account's allow-list in effect: the config's, with runtime changes."""
        return list(self.pipeline.policy.allowed_senders)

    async def allow_sender(self, entry: str, *, account: str | None = None) -> None:
        """Allow ``entry`` (an address, ``@domain`` or ``*``) from now on, and after a
        restart: the change is on disk before this returns. Mail already refused
        stays refused; the sender's next mail is handed on. ``account``: that account
        only (default: every account)."""
        await self._change_sender(entry, allow=True, account=account)

    async def remove_sender(self, entry: str, *, account: str | None = None) -> None:
        """Take ``entry`` off the allow-list (also an entry of the config's list), from
        now on and after a restart. Only that entry: removing ``bob@x.org`` does not
        refuse bob while ``@x.org`` is allowed. ``account``: as for :meth:`allow_sender`."""
        await self._change_sender(entry, allow=False, account=account)

    async def _change_sender(self, entry: str, *, allow: bool, account: str | None) -> None:
        item = sender_entry(entry) if isinstance(entry, str) else None
        if item is None:
            raise ChannelError(
                f"{entry!r} is neither an address, '@domain' nor '*'", code="invalid_argument"
            )
        await self.start()
        targets = [self._account_of(account)] if account is not None else self.accounts.values()
        for target in targets:
            key, in_config = target.config.account, item in target.config.allowed_senders
            try:
                await self.store.change_sender(key, item, allow=allow, in_config=in_config)
                await target.apply_runtime_senders()
            except ChannelError as exc:
                exc.account = target.name
                raise
            event = "channel.sender_allowed" if allow else "channel.sender_removed"
            log_event(log, logging.INFO, event, account=key, sender=item)

    # --- readiness and status ---

    def _selected(self, account: str | None) -> list[_Account]:
        if account is None:
            return list(self.accounts.values())
        found = self.accounts.get(account)
        if found is None:
            raise ChannelError(
                f"no account named {account!r} (accounts: {', '.join(self.accounts)})",
                code="account_unknown",
            )
        return [found]

    async def wait_ready(
        self,
        timeout: float,  # noqa: ASYNC109 (the contract)
        account: str | None = None,
    ) -> ChannelStatus:
        """While :meth:`listen` runs: return once every mailbox (or those of
        ``account``) is logged in with its folder selected and the SMTP login was
        checked. A permanent failure (``auth_failed``, ``tls_verify_failed``,
        ``folder_missing``, ``oauth_reauth_required`` ...) raises a ChannelError with
        that code, and ``.account`` naming the account, at once; ``timeout`` seconds
        without either raise NotReadyError (code ``timeout``, also a TimeoutError)."""
        reporters = [r for a in self._selected(account) for r in a.reporters]
        if isinstance(self.store, PostgresStore):
            # Replicas: only the mailboxes whose lease this one took count.
            start = time.monotonic()
            keeper = await self._first_tick(timeout)
            timeout = max(0.0, timeout - (time.monotonic() - start))
            keys = {a.name: a.config.account for a in self.accounts.values()}
            reporters = [r for r in reporters
                         if (keys.get(r.name or ""), r.folder) in keeper.held]  # fmt: skip
            if not reporters:
                return ChannelStatus(ChannelState.CONNECTED, True, True)
        if len(reporters) == 1:
            return await reporters[0].wait_ready(timeout)
        waits = {asyncio.create_task(r.wait_ready(timeout)): r for r in reporters}
        late: list[StatusReporter] = []
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, NotReadyError):
                        late.append(waits[task])
                    elif exc is not None:
                        raise exc
        finally:
            for task in waits:
                task.cancel()
        if late:
            names = ", ".join(f"{r.name}/{r.folder}" if r.folder else f"{r.name}" for r in late)
            error = NotReadyError(
                f"not ready within {timeout:g} s: {names}", status=late[0].current
            )
            error.account = late[0].name if len({r.name for r in late}) == 1 else None
            raise error
        return self._overall([r.current for r in reporters])

    @property
    def state(self) -> ChannelStatus:
        """The current :class:`ChannelStatus`: the one mailbox's, or with several, the
        first that is not connected (or "connected" once all of them are)."""
        return self._overall([r.current for a in self.accounts.values() for r in a.reporters])

    @staticmethod
    def _overall(statuses: list[ChannelStatus]) -> ChannelStatus:
        if len(statuses) == 1:
            return statuses[0]
        order = (ChannelState.FAILED, ChannelState.RECONNECTING, ChannelState.STARTING,
                 ChannelState.CLOSED)  # fmt: skip
        for state in order:
            for status in statuses:
                if status.state is state:
                    return status
        since = max(s.since for s in statuses)
        return ChannelStatus(ChannelState.CONNECTED, True, True, since=since)

    def mailboxes(self) -> list[MailboxStatus]:
        """One :class:`MailboxStatus` per mailbox (account, folder) this channel serves:
        a snapshot, cheap enough for a status page or a health probe to call often."""
        boxes = [
            _mailbox_status(account.name, engine)
            for account in self.accounts.values()
            for engine in account.engines.values()
        ]
        keeper = self._keeper
        if keeper is None:
            return boxes
        out = []
        for box in boxes:
            mailbox = (self.accounts[box.account].config.account, box.folder)
            here = keeper.lease(mailbox) is not None
            holder = self.replica_id if here else keeper.holders.get(mailbox)
            update: dict[str, object] = {"replica": holder, "here": here}
            if not here:
                update |= {"state": ChannelState.CLOSED, "idling": False, "code": None}
            out.append(box.model_copy(update=update))
        return out

    @property
    def status(self) -> SyncStatus:
        """The (first) mailbox's IMAP side in detail (mode, cursor, last error): diagnostics."""
        return self.sync.status

    def stats(self) -> dict[str, int]:
        """Counters over every mailbox: connects, reconnects by cause, IDLE cycles, fetched,
        delivered, skipped..."""
        return self.metrics.snapshot()

    def counters(self) -> list[tuple[str, str | None, dict[str, int]]]:
        """The counters apart: (account, folder, counts) per mailbox, and (account, None,
        counts) for what belongs to the account as a whole (policy decisions, replies,
        the outbox). Their sum is :meth:`stats`."""
        out: list[tuple[str, str | None, dict[str, int]]] = []
        for account in self.accounts.values():
            out.append((account.name, None, account.metrics.snapshot()))
            out += [(account.name, f, e.metrics.snapshot()) for f, e in account.engines.items()]
        return out

    async def health_check(self, account: str | None = None) -> bool:
        """True unless, for some account (or ``account``), authentication failed, the
        state cannot be written (the hand-off is paused), the outbox cannot reach its
        server or OAuth needs a new sign-in."""
        return self._started and all(a.healthy() for a in self._selected(account))

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


def _mailbox_status(name: str, engine: SyncEngine) -> MailboxStatus:
    status = engine.reporter.current
    return MailboxStatus(
        account=name,
        folder=engine.folder,
        state=status.state,
        code=status.code,
        message=status.message,
        idling=engine.status.idling,
        last_message_at=engine.writer.last_handed_on_at,
        last_sync_at=engine.status.last_sync_at,
    )


async def _serve_mailbox(
    account: _Account, engine: SyncEngine, queue: asyncio.Queue[ChannelMessage]
) -> None:
    """One mailbox until cancelled. The engine retries every failure itself; what still
    escapes it (a state read at its start) is retried here, so no mailbox ever stops
    the others, and none stops for good."""
    backoff = Backoff(base=1.0, cap=300.0)
    while True:
        try:
            await engine.run(queue)
            return
        except (asyncio.CancelledError, LeaseLost):
            raise
        except Exception as exc:
            delay = backoff.next()
            engine.reporter.imap_failed(exc, delay)
            log_event(log, logging.ERROR, "channel.mailbox_failed", exc=exc,
                      account=account.config.account, folder=engine.folder,
                      code=failure_code(exc), retry_in=f"{delay:.1f}s")  # fmt: skip
            await asyncio.sleep(delay)


def _check_accounts(configs: Mapping[str, EmailConfig], token_provider: object) -> None:
    """What one channel cannot serve together (load_accounts checks the same for a file)."""
    if not configs:
        raise ConfigError("no account to serve", problems=["accounts: none given"])
    problems = same_login_problems(configs)
    first_name, first = next(iter(configs.items()))
    for name, cfg in configs.items():
        problems += [
            f"accounts.{name}.{f}: differs from account {first_name!r}'s; one value serves all"
            for f in SERVICE_FIELDS
            if getattr(cfg, f) != getattr(first, f)
        ]
    if token_provider is not None and len(configs) > 1:
        problems.append(
            "token_provider: serves one account; use auth_method = 'oauth2' per account"
        )
    if problems:
        raise ConfigError(
            "invalid email configuration:\n  - " + "\n  - ".join(problems), problems=problems
        )


def account_names(channel: EmailChannel) -> Iterable[str]:
    """The names of the accounts ``channel`` serves, in configuration order."""
    return channel.accounts.keys()


async def quarantined_messages(
    store: Storage, account: str, limit: int = 100
) -> list[QuarantinedMessage]:
    """The quarantined mail of ``account`` as the host and the CLI see it (one place)."""
    return [_quarantined(q) for q in await store.quarantined(account, limit)]


def _quarantined(q: QuarantinedMail) -> QuarantinedMessage:
    key = q.key
    return QuarantinedMessage(
        id=release_id(key),
        account=key.account,
        message_id=q.message_id,
        sender=q.sender,
        subject=q.subject,
        reason=q.reason,
        received_at=q.received_at,
    )
