"""The command line: ``prx-email`` and the host framework's spelling ``prx channel ... email``.

Every failure ends as one readable paragraph on stderr and an exit code, never a
traceback (``--debug`` shows one). Nothing here prints a secret: ``config`` shows
the redacted settings and the doctor never echoes a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prx_channel_email._inbound.policy import describe_sender_auth
from prx_channel_email._inbound.quarantine import parse_release_id, request_release, wait_released
from prx_channel_email._storage import OutboxEntry, OutboxStore, state_exists, storage_of
from prx_channel_email._support.observability import log_event
from prx_channel_email.channel import EmailChannel, quarantined_messages
from prx_channel_email.config import EmailConfig, load_accounts, load_config, resolve_path
from prx_channel_email.doctor import DoctorReport, doctor_accounts
from prx_channel_email.errors import ChannelError, ConfigError, SendError
from prx_channel_email.models import ChannelMessage, QuarantinedMessage, SendMessage
from prx_channel_email.status import MailboxStatus

Handler = Callable[[ChannelMessage], Awaitable[str | None]]

log = logging.getLogger("prx_channel_email.cli")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DRAIN_SECS = 30.0  # how long a shutdown waits for handlers that are already running
DEMO_SECS = 60.0  # the demo gives up (exit 1) if no reply arrived by then

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file with a \\[channels_config.email] table. "
        "Default: $PRX_CONFIG, else ./config.toml.",
        show_default=False,
        dir_okay=False,
    ),
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Verbose logs, and a traceback on unexpected errors.")
]


# --------------------------------------------------------------------------- errors


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@contextlib.contextmanager
def _guard(debug: bool) -> Iterator[None]:
    """Turn every error into one paragraph and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ConfigError as exc:
        _fail(exc.message + "\nSee config.toml.example for every field.", EXIT_CONFIG)
    except ChannelError as exc:
        if debug:
            err.print(traceback.format_exc())
        _fail(f"{exc.message} [{exc.code}]")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            err.print(traceback.format_exc())
            _fail(f"unexpected {type(exc).__name__}: {exc}")
        _fail(
            f"unexpected {type(exc).__name__}: {exc}. "
            "Run again with --debug for the full traceback."
        )


def _logging(debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("aioimaplib", "mail.log", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _load(config_path: Path | None) -> EmailConfig:
    return load_config(config_path)


# --------------------------------------------------------------------------- handlers


async def echo(msg: ChannelMessage) -> str:
    """The built-in handler: quote what the person wrote back to them."""
    text = msg.content.strip() or "(an empty message)"
    quoted = "\n".join(f"> {line}" if line else ">" for line in text.splitlines())
    return f"You wrote:\n\n{quoted}\n\n(echo bot, prx-channel-email)"


def load_handler(spec: str) -> Handler:
    """``echo``, ``package.module:function`` or ``path/to/file.py:function``."""
    if spec == "echo":
        return echo
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ChannelError(
            f"handler {spec!r} is not 'echo' or 'module:function' "
            "(e.g. mybot:handle or ./bot.py:handle)",
            code="handler_invalid",
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # like `python -m`: modules in the current directory
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise ChannelError(
            f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}",
            code="handler_invalid",
        ) from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise ChannelError(
            f"module {module_name!r} has no function {func_name!r}", code="handler_invalid"
        )
    if not inspect.iscoroutinefunction(func):
        raise ChannelError(
            f"handler {spec!r} must be 'async def {func_name}(msg: ChannelMessage) -> str | None'",
            code="handler_invalid",
        )
    return cast(Handler, func)


async def _answer(channel: EmailChannel, handler: Handler, msg: ChannelMessage) -> None:
    """Run the handler on one message and send its answer as the threaded reply."""
    account = channel.config.account
    try:
        answer = await handler(msg)
        if answer is None:
            log_event(log, logging.INFO, "handler.no_reply", account=account, message_id=msg.id)
        else:
            try:
                await channel.send(msg.reply(answer))  # a durable reply acks msg as well
            except SendError:
                await channel.ack(msg)  # refused for good: a redelivery would not help
                raise
            log_event(log, logging.INFO, "handler.replied", account=account, message_id=msg.id)
        # The handler returned: msg is handled (a handler that raised, or a run stopped
        # meanwhile, leaves it in flight, so it comes again at the next start).
        await channel.ack(msg)
    except asyncio.CancelledError:
        log_event(
            log,
            logging.WARNING,
            "handler.cancelled",
            account=account,
            message_id=msg.id,
            code="shutdown",
        )
        raise
    except Exception as exc:
        # One bad message must not stop the bot; the error is logged with its id.
        log_event(log, logging.ERROR, "handler.failed", exc=exc, account=account, message_id=msg.id)


async def serve(
    channel: EmailChannel,
    handler: Handler,
    stop: asyncio.Event,
    *,
    drain_secs: float = DRAIN_SECS,
) -> None:
    """Feed every inbound message to ``handler`` until ``stop`` is set or listening fails.

    On stop: listening ends first (no new mail is taken), then messages already on
    the queue and handlers already running get ``drain_secs`` to finish. Replies
    not yet accepted by SMTP stay in the durable outbox for the next start.
    """
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    listener = asyncio.create_task(channel.listen(queue), name="email-listen")
    running: set[asyncio.Task[None]] = set()
    stopper = asyncio.create_task(stop.wait())
    problem: BaseException | None = None

    def dispatch(msg: ChannelMessage) -> None:
        task = asyncio.create_task(_answer(channel, handler, msg))
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        while True:
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait(
                {getter, listener, stopper}, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                dispatch(getter.result())
                continue
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getter
            break
    finally:
        stopper.cancel()
        if not listener.done():
            listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            (problem,) = await asyncio.gather(listener, return_exceptions=True)
        while not queue.empty():
            dispatch(queue.get_nowait())
        if running:
            _, late = await asyncio.wait(set(running), timeout=drain_secs)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
    if isinstance(problem, BaseException) and not isinstance(problem, asyncio.CancelledError):
        raise problem


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)


async def _run(accounts: dict[str, EmailConfig], handler: Handler) -> None:
    """Serve every account of the config (one channel) until Ctrl-C / SIGTERM."""
    stop = asyncio.Event()
    _install_stop(stop)
    async with EmailChannel(accounts) as channel:
        several = len(accounts) > 1
        for name, config in accounts.items():
            senders = ", ".join(config.allowed_senders) or "nobody (allowed_senders is empty)"
            label = f"account {escape(name)}: " if several else ""
            folders = ", ".join(config.imap_folders) if "receive" in config.capabilities else "-"
            err.print(
                f"[green]listening[/] {label}on {escape(config.account)} folder"
                f"{'s' if len(config.imap_folders) > 1 else ''} {escape(folders)}; "
                f"answering {escape(senders)}."
            )
            problem, auth = describe_sender_auth(config)
            err.print(f"[yellow]{escape(auth)}[/]" if problem else escape(auth))
        err.print("Ctrl-C stops.")
        await serve(channel, handler, stop)
    err.print("stopped; unsent replies stay queued for the next start.")


# --------------------------------------------------------------------------- doctor output


_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def render_report(report: DoctorReport, console: Console) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        style = _STYLE[check.status]
        detail = escape(check.detail)
        if check.fix and check.status in ("fail", "warn"):
            detail += f"\n[{style}]fix:[/] {escape(check.fix)}"
        table.add_row(f"[{style}]{_MARK[check.status]}[/]", escape(check.name), detail)
    console.print(table)
    failed, warned = len(report.failed), len(report.warnings)
    if report.config_invalid:
        console.print("[bold red]The configuration is invalid[/] (exit 2).")
    elif failed:
        console.print(f"[bold red]{failed} check(s) failed[/], {warned} warning(s) (exit 1).")
    else:
        console.print(f"[green]All checks passed[/] with {warned} warning(s).")


def _doctor(
    config_path: Path | None,
    as_json: bool,
    send_test: str | None,
    budget: float,
    account: str | None = None,
    push_test: bool = False,
) -> int:
    shown = str(resolve_path(config_path))
    run = functools.partial(
        doctor_accounts,
        config_path,
        account=account,
        send_test=send_test,
        push_test=push_test,
        check_timeout=budget,
    )

    async def go() -> list[DoctorReport]:
        if as_json or not err.is_terminal:
            return await run()
        with err.status(f"checking {escape(shown)} ...") as status:

            def progress(text: str) -> None:
                status.update(f"checking: {escape(text)}")

            return await run(progress=progress)

    reports = asyncio.run(go())
    worst = max(r.exit_code for r in reports)
    # One account (the config's only one, or the one asked for): the report as it
    # always was. Several: one report per account, and the worst exit code.
    several = len(reports) > 1
    if as_json:
        if several:
            data: dict[str, Any] = {
                "ok": worst == EXIT_OK,
                "exit_code": worst,
                "config": shown,
                "accounts": {r.account: r.to_dict() for r in reports},
            }
        else:
            data = reports[0].to_dict()
        print(json.dumps(data, indent=2))
        return worst
    out.print(f"prx-email doctor: {escape(shown)}")
    for report in reports:
        if several or account is not None:
            out.print(f"\n[bold]account {escape(report.account or '')}[/]")
        render_report(report, out)
    if several:
        bad = ", ".join(r.account or "" for r in reports if r.exit_code != EXIT_OK)
        verdict = f"[bold red]problems in {escape(bad)}[/]" if bad else "[green]all fine[/]"
        out.print(f"\n{len(reports)} accounts: {verdict}")
    return worst


# --------------------------------------------------------------------------- send


async def _send(
    config: EmailConfig, to: str, subject: str | None, text: str, attach: list[Path]
) -> tuple[str, bool]:
    """Send through the outbox; returns (Message-ID, whether the server accepted it now)."""
    async with EmailChannel(config) as channel:
        message_id = await channel.send_message(
            SendMessage(content=text, recipient=to, subject=subject, attachments=attach)
        )
        return message_id, channel.metrics.get("outbound.sent") > 0


# --------------------------------------------------------------------------- outbox


async def _outbox(config: EmailConfig, op: Callable[[OutboxStore], Awaitable[Any]]) -> Any:
    """Run ``op`` on the outbox rows of the account (no SMTP, no IMAP)."""
    if config.state_url is None and not state_exists(config.state_dir):
        raise ChannelError(
            f"no state in {config.state_dir} yet: nothing was ever sent with this config",
            code="no_state",
        )
    async with storage_of(config) as store:
        return await op(store.outbox(config.account))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _show_outbox(entries: list[OutboxEntry], console: Console) -> None:
    """One line per row (long addresses and errors must not be cut), the error below it."""
    width = max(len(str(e.id)) for e in entries)
    for e in entries:
        console.print(
            f"{e.id:>{width}}  {e.state:<7}  attempts={e.attempts}  {escape(e.recipient)}"
            f"  {escape(e.message_id)}  {_when(e.updated_at)}"
        )
        if e.last_error:
            code = f"[{e.smtp_code}] " if e.smtp_code is not None else ""
            console.print(f"{'':>{width}}  last error: {escape(code + e.last_error)}")


# --------------------------------------------------------------------------- quarantine


def _age(ts: float, now: float) -> str:
    secs = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _show_quarantined(entries: list[QuarantinedMessage], console: Console) -> None:
    now = time.time()
    for q in entries:
        console.print(
            f"{escape(q.id)}  {_age(q.received_at, now):>4}  {escape(q.sender or '?')}"
            f"  {escape(repr(q.subject))}  reason={escape(q.reason)}"
        )


# --------------------------------------------------------------------------- demo


def _show_message(msg: ChannelMessage, console: Console) -> None:
    table = Table(title="normalized incoming message (ChannelMessage)", show_header=False)
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in msg.model_dump(mode="json").items():
        table.add_row(key, escape(repr(value) if not isinstance(value, str) else value))
    console.print(table)


def _show_reply(raw: bytes, console: Console) -> None:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    table = Table(title="the threaded reply, as it arrived in the user's inbox", show_header=False)
    table.add_column("header", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name in ("From", "To", "Subject", "Message-ID", "In-Reply-To", "References"):
        table.add_row(name, escape(str(parsed.get(name, ""))))
    body = parsed.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    table.add_row("body", escape(str(text).strip()))
    console.print(table)


async def run_demo(
    *,
    keep_running: bool = False,
    console: Console | None = None,
    state_dir: Path | None = None,
    within: float = DEMO_SECS,
) -> int:
    """Sandbox server + echo bot on the real EmailChannel + one sample email. Returns 0/1."""
    from prx_channel_email._demo.sandbox import MailSandbox

    console = console or out
    seen: asyncio.Queue[ChannelMessage] = asyncio.Queue()

    async def demo_handler(msg: ChannelMessage) -> str | None:
        await seen.put(msg)
        return await echo(msg)

    async with MailSandbox() as sandbox:
        tmp = None
        if state_dir is None:
            tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="prx-email-demo-")
            state_dir = Path(tmp)
        config = sandbox.channel_config(state_dir)
        console.print(
            f"[bold]sandbox mail server[/] on {sandbox.host}: IMAP {sandbox.imap_port} "
            f"(IDLE), SMTP {sandbox.smtp_port}; the bot is {sandbox.bot.address}"
        )
        stop = asyncio.Event()
        _install_stop(stop)
        async with EmailChannel(config) as channel:
            bot = asyncio.create_task(serve(channel, demo_handler, stop, drain_secs=10))
            try:
                await sandbox.send_as_user(
                    "Hello bot", "Hi! Can you hear me?\n\nThanks,\nAlice\n\n-- \nAlice Example\n"
                )
                console.print(f"{sandbox.user.address} sent 'Hello bot' to the bot ...")
                try:
                    msg = await _first(seen, bot, within)
                    _show_message(msg, console)
                    reply = await _first_mail(sandbox, bot, within)
                except TimeoutError:
                    console.print(
                        f"[bold red]no reply within {within:g} s[/]; run with --debug for logs."
                    )
                    return EXIT_FAILED
                _show_reply(reply, console)
                console.print("[green]the echo bot answered in the same thread.[/]")
                if keep_running:
                    config_file = state_dir / "sandbox.toml"
                    await asyncio.to_thread(config_file.write_text, sandbox.config_toml(state_dir))
                    _print_keep_running(sandbox, console, config_file)
                    await stop.wait()
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await bot
    return EXIT_OK


async def _first(
    queue: asyncio.Queue[ChannelMessage], bot: asyncio.Task[None], within: float
) -> ChannelMessage:
    getter = asyncio.create_task(queue.get())
    done, _ = await asyncio.wait({getter, bot}, timeout=within, return_when="FIRST_COMPLETED")
    if getter in done:
        return getter.result()
    getter.cancel()
    if bot in done:
        bot.result()  # raises the channel's error
    raise TimeoutError


async def _first_mail(sandbox: Any, bot: asyncio.Task[None], within: float) -> bytes:
    waiter = asyncio.create_task(sandbox.wait_for_mail(sandbox.user.address, within=within))
    done, _ = await asyncio.wait({waiter, bot}, return_when="FIRST_COMPLETED")
    if waiter in done:
        return cast(bytes, waiter.result())
    waiter.cancel()
    bot.result()
    raise TimeoutError


def _print_keep_running(sandbox: Any, console: Console, config_file: Path) -> None:
    host, port = sandbox.host, sandbox.smtp_port
    user, bot = sandbox.user.address, sandbox.bot.address
    secret = sandbox.user.password
    console.print("\n[bold]The sandbox keeps running.[/] Send it more mail:")
    for line in sandbox.describe():
        console.print("  " + escape(line))
    one_liner = (
        f"python -c \"import smtplib; s = smtplib.SMTP('{host}', {port}); "
        f"s.login('{user}', '{secret}'); s.sendmail('{user}', ['{bot}'], "
        f"'From: {user}\\\\nSubject: again\\\\n\\\\nhello once more'); s.quit()\""
    )
    console.print(
        "\n  For example (only sandbox users get mail; the bot answers only mail sent\n"
        "  after logging in: without it, a From of a sandbox user is a forgery):\n"
        f"    {escape(one_liner)}\n"
        f"  or: swaks --server {host}:{port} --from {user} --to {bot}"
        f" --auth-user {user} --auth-password {secret}\n"
        f"  Read the replies over IMAP as {user} / {sandbox.user.password}\n"
        f"  The bot's settings: {escape(str(config_file))}  "
        f"(try: prx-email doctor --config {escape(str(config_file))})\n"
        "  Ctrl-C stops.",
        soft_wrap=True,
    )


# --------------------------------------------------------------------------- commands

HELP = """The email channel for agent frameworks: IMAP IDLE in, threaded SMTP replies out.

Start with [bold]prx-email demo[/] (no account needed), then write a config.toml
(see config.toml.example) and check it with [bold]prx-email doctor[/].
"""

app = typer.Typer(
    name="prx-email",
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("doctor")
def doctor_cmd(
    config: ConfigOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (for scripts).")
    ] = False,
    send_test: Annotated[
        str | None,
        typer.Option(
            "--send-test",
            metavar="ADDRESS",
            help="Also send one test message to ADDRESS. Without it nothing is sent.",
        ),
    ] = None,
    check_timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds allowed for each check.")
    ] = 10.0,
    account: Annotated[
        str | None,
        typer.Option("--account", metavar="NAME", help="Check only this account of the config."),
    ] = None,
    push_test: Annotated[
        bool,
        typer.Option(
            "--push-test",
            help="Measure push: APPEND a marked test message to the folder, time the "
            "server's announcement while idling, delete the message again.",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Check the whole mail setup and say how to fix what is wrong.

    Checks the config, DNS, TCP, TLS (certificate, host name, expiry), the IMAP
    greeting, login, IDLE, the folder, sender-verification headers, SMTP EHLO,
    STARTTLS and AUTH, the From address, allowed_senders and the directories;
    for every account of the config, or only the one named by --account.

    Exit status: 0 nothing failed (warnings allowed), 1 a check failed,
    2 the config is invalid.
    """
    _logging(debug, quiet=True)
    with _guard(debug):
        raise typer.Exit(_doctor(config, as_json, send_test, check_timeout, account, push_test))


@app.command("run")
def run_cmd(
    handler: Annotated[
        str,
        typer.Argument(
            help="[bold]echo[/], or [bold]module:function[/] naming "
            "'async def handle(msg: ChannelMessage) -> str | None'; "
            "the returned text is sent as the threaded reply (None: no reply)."
        ),
    ] = "echo",
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run the channel: answer every allowed email with HANDLER until Ctrl-C / SIGTERM.

    On shutdown, listening stops first, running handlers get 30 s to finish,
    and replies not yet sent stay queued for the next start.
    """
    _logging(debug)
    with _guard(debug):
        accounts = load_accounts(config)
        func = load_handler(handler)
        asyncio.run(_run(accounts, func))


@app.command("send")
def send_cmd(
    text: Annotated[str, typer.Argument(help="The message text (Markdown); '-' reads stdin.")],
    to: Annotated[str, typer.Option("--to", help="Recipient address.")],
    subject: Annotated[
        str | None, typer.Option("--subject", "-s", help="Default: default_subject.")
    ] = None,
    attach: Annotated[
        list[Path] | None, typer.Option("--attach", "-a", help="A file to attach (repeatable).")
    ] = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Send one message (to test a setup). Goes through the durable outbox."""
    _logging(debug, quiet=True)
    with _guard(debug):
        cfg = _load(config)
        body = sys.stdin.read() if text == "-" else text
        message_id, accepted = asyncio.run(_send(cfg, to, subject, body, list(attach or [])))
        if not accepted:
            _fail(
                f"the SMTP server did not take {message_id} yet (a temporary failure; see the "
                "log above). It stays queued and is retried the next time the channel runs "
                "(prx-email run). Check the setup with: prx-email doctor"
            )
        out.print(f"sent {escape(message_id)} to {escape(to)}")


outbox_app = typer.Typer(
    help="Look at the outbox (replies stored for sending) and retry failed ones.",
    no_args_is_help=True,
)
app.add_typer(outbox_app, name="outbox")

OUTBOX_STATES = ("pending", "sending", "sent", "failed")


@outbox_app.command("list")
def outbox_list_cmd(
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state", help="Only rows in this state (repeatable): " + ", ".join(OUTBOX_STATES)
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many rows.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """The newest outbox rows: id, state, recipient, attempts, last error. Never the text."""
    with _guard(debug):
        wanted = list(state or [])
        bad = [s for s in wanted if s not in OUTBOX_STATES]
        if bad:
            _fail(f"unknown state {', '.join(bad)}; use one of {', '.join(OUTBOX_STATES)}")
        cfg = _load(config)
        entries: list[OutboxEntry] = asyncio.run(
            _outbox(cfg, lambda t: t.entries(wanted, max(1, limit)))
        )
        if as_json:
            print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        elif not entries:
            out.print("the outbox is empty" if not wanted else "no rows in that state")
        else:
            _show_outbox(entries, out)


@outbox_app.command("retry")
def outbox_retry_cmd(
    ids: Annotated[
        list[int] | None,
        typer.Argument(
            help="Ids of failed rows to retry (see outbox list). Default: every row "
            "that failed only because its attempts ran out."
        ),
    ] = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Put failed replies back in the queue; the running channel (or the next start) sends them.

    Without ids: the replies that gave up after temporary failures (an outage).
    With ids: exactly those failed rows, whatever the failure (after you fixed its cause).
    Each goes out with the same Message-ID and bytes as before.
    """
    with _guard(debug):
        cfg = _load(config)
        wanted = list(ids or [])
        if wanted:
            n = asyncio.run(_outbox(cfg, lambda t: t.requeue_ids(wanted)))
            if n < len(wanted):
                err.print(
                    f"{len(wanted) - n} of the given ids are not failed rows of "
                    f"{escape(cfg.account)}; left alone"
                )
        else:
            n = asyncio.run(_outbox(cfg, lambda t: t.requeue_exhausted()))
        out.print(
            f"requeued {n} repl{'y' if n == 1 else 'ies'}: a running channel sends "
            "them within a minute, otherwise the next prx-email run does"
        )


quarantine_app = typer.Typer(
    help="Look at mail the policy quarantined (held, never handed on).", no_args_is_help=True
)
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("list")
def quarantine_list_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Quarantined mail, newest first: id, age, sender, subject, reason. Never the text
    (it stays unread on the server, where it was)."""
    with _guard(debug):
        cfg = _load(config)

        async def listed() -> list[QuarantinedMessage]:
            if cfg.state_url is None and not state_exists(cfg.state_dir):
                return []
            async with storage_of(cfg) as store:
                return await quarantined_messages(store, cfg.account, max(1, limit))

        entries = asyncio.run(listed())
        if as_json:
            print(json.dumps([e.model_dump() for e in entries], indent=2))
        elif not entries:
            out.print("nothing is quarantined")
        else:
            _show_quarantined(entries, out)


@quarantine_app.command("release")
def quarantine_release_cmd(
    quarantine_id: Annotated[
        str, typer.Argument(metavar="ID", help="The id `prx-email quarantine list` shows.")
    ],
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait for the running channel to hand it on (0: don't)."
        ),
    ] = 30.0,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Hand one quarantined mail on to the agent, once, like any mail it receives.

    The request is stored; the running channel (or the next `prx-email run`) fetches
    the mail again and hands it on if the policy, less the quarantine that held it,
    lets it through: the allow-list and sender authentication still apply.
    Mail quarantined as unverified_sender cannot be released.
    """
    with _guard(debug):
        cfg = _load(config)

        async def released() -> tuple[str, str, bool]:
            key = parse_release_id(cfg.account, quarantine_id)
            if cfg.state_url is None and not state_exists(cfg.state_dir):
                raise ChannelError(
                    f"no quarantined mail {quarantine_id!r}: nothing was received with this"
                    " config yet",
                    code="quarantine_unknown",
                )
            async with storage_of(cfg) as store:
                asked = await request_release(store, key, quarantine_id)
                if wait <= 0:
                    return asked.message_id, asked.sender, False
                try:
                    await wait_released(store, key, quarantine_id, wait)
                except ChannelError as exc:
                    if exc.code != "quarantine_release_pending":
                        raise
                    return asked.message_id, asked.sender, False
                return asked.message_id, asked.sender, True

        message_id, sender, done = asyncio.run(released())
        what = f"{escape(message_id)} from {escape(sender or '?')}"
        if done:
            out.print(f"released {escape(quarantine_id)}: handed on ({what})")
        else:
            out.print(
                f"release of {escape(quarantine_id)} requested ({what}): a running `prx-email"
                " run` hands it on within seconds, otherwise the next start does"
            )


@app.command("mcp")
def mcp_cmd(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Serve the mailbox tools over MCP on stdio (for Claude Desktop, Cursor, any MCP client).

    Every account of the config is served (the tools' account argument chooses one).
    The tools show only mail the channel would hand on; the write tools are offered
    only with tools_write = true. Logs go to stderr; stdout carries the protocol.
    Needs the mcp extra: pip install "prx-channel-email\\[mcp]".
    """
    _logging(debug, quiet=not debug)
    with _guard(debug):
        accounts = load_accounts(config)  # every account (one, named "default", without a table)
        try:
            from prx_channel_email._tools.mcp_server import serve_stdio
        except ImportError:
            _fail('prx-email mcp needs the MCP SDK: pip install "prx-channel-email[mcp]"')

        async def go() -> None:
            async with EmailChannel(accounts) as channel:
                await serve_stdio(channel.tools)

        asyncio.run(go())


@app.command("demo")
def demo_cmd(
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running", help="Leave the sandbox and bot up, and print how to mail it."
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """See the bot answer an email in a minute: no account, no config needed.

    Starts a local sandbox mail server in this process (IMAP with IDLE + SMTP),
    runs the echo bot on it through the real EmailChannel, sends it an email
    from a user, and shows the normalized message and the threaded reply.
    """
    _logging(debug, quiet=not debug)
    with _guard(debug):
        raise typer.Exit(asyncio.run(run_demo(keep_running=keep_running)))


@app.command("config")
def config_cmd(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Validate the config and print it with secrets masked. Exit 2 when invalid."""
    with _guard(debug):
        cfg = _load(config)
        data = cfg.redacted()
        if as_json:
            print(json.dumps(data, indent=2, default=str))
            return
        out.print(f"# {escape(str(resolve_path(config)))}: valid")
        out.print("[channels_config.email]")
        for key, value in data.items():
            out.print(f"{key} = {escape(json.dumps(value, default=str))}")


@app.command("status")
def mailboxes_status_cmd(
    config: ConfigOpt = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="The instance's endpoint, e.g. http://127.0.0.1:9187 "
            "(default: metrics_host and metrics_port of the config).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait.")] = 5.0,
    debug: DebugOpt = False,
) -> None:
    """Show each mailbox of a running instance (read from its /status endpoint).

    Exit status: 0 every mailbox is connected, 1 one is not, 2 the config is
    invalid, 3 no instance answers.
    """
    from prx_channel_email._ops.client import fetch_status, status_url

    with _guard(debug):
        if url is None:
            # Service-wide settings: every account has the same (load_accounts checks).
            cfg = next(iter(load_accounts(config).values()))
            if not cfg.metrics_port:
                _fail(
                    f"metrics_port is 0 (off) in {resolve_path(config)}: set it and restart "
                    "the instance, or pass --url.",
                    EXIT_CONFIG,
                )
            url = f"http://{_url_host(cfg.metrics_host)}:{cfg.metrics_port}"
        try:
            boxes = fetch_status(status_url(url), timeout)
        except ChannelError as exc:
            _fail(exc.message, EXIT_UNREACHABLE)
        if as_json:
            print(json.dumps([b.model_dump(mode="json") for b in boxes], indent=2))
        else:
            _show_mailboxes(boxes, out)
        raise typer.Exit(EXIT_OK if all(b.healthy for b in boxes) else EXIT_FAILED)


def _url_host(host: str) -> str:
    """A host for a URL: a wildcard bind address is reached on loopback; IPv6 in brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"[{host}]" if ":" in host else host


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    secs = max(0, int(datetime.now(UTC).timestamp() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def _show_mailboxes(boxes: list[MailboxStatus], console: Console) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("account", "folder", "state", "code", "idle", "last message"):
        table.add_column(column.upper(), no_wrap=column != "code")
    replicas = any(b.replica for b in boxes)
    if replicas:
        table.add_column("REPLICA", no_wrap=True)
    for b in boxes:
        state = f"[{'green' if b.healthy else 'bold red'}]{b.state.value}[/]"
        row = [escape(b.account), escape(b.folder), state, escape(b.code or "-"),
               "yes" if b.idling else "no", _ago(b.last_message_at)]  # fmt: skip
        if replicas:
            row.append(escape(b.replica or "-"))
        table.add_row(*row)
    console.print(table)
    bad = sum(not b.healthy for b in boxes)
    console.print(
        f"{len(boxes)} mailbox(es), "
        + (f"[bold red]{bad} not connected[/]" if bad else "[green]all connected[/]")
    )


# ---- prx-email auth: OAuth sign-in (the flows are in oauth_flows.py)

auth_app = typer.Typer(
    help="Sign in with OAuth 2.0 (auth_method = 'oauth2'): login, status, logout.",
    no_args_is_help=True,
)


def _oauth_config(config: ConfigOpt) -> EmailConfig:
    cfg = _load(config)
    if cfg.auth_method != "oauth2":
        _fail(
            "auth_method is 'password' in this config; set auth_method = 'oauth2', "
            "oauth_provider and oauth_client_id first (see docs/guides/providers.md, OAuth)"
        )
    return cfg


def _say(text: str) -> None:
    out.print(escape(text))


@auth_app.command("login")
def login_cmd(
    no_browser: Annotated[
        bool,
        typer.Option("--no-browser", help="Print the sign-in URL instead of opening a browser."),
    ] = False,
    device: Annotated[
        bool,
        typer.Option("--device", help="Device-code flow: enter a code on another device."),
    ] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Sign in and store the grant under state_dir (owner-only).

    Default: authorization code with PKCE and a redirect to 127.0.0.1 on this
    machine. A running channel picks up the new grant by itself.
    """
    _logging(debug, quiet=not debug)
    with _guard(debug):
        if no_browser and device:
            _fail("choose one of --no-browser and --device")
        cfg = _oauth_config(config)
        from prx_channel_email._oauth.flows import login_browser, login_device

        if device:
            record = asyncio.run(login_device(cfg, say=_say))
        else:
            record = asyncio.run(login_browser(cfg, open_browser=not no_browser, say=_say))
        out.print(
            f"signed in as {escape(cfg.username)}; scopes: {escape(record.scope or '-')}. "
            "Check it with: prx-email doctor"
        )


@auth_app.command("status")
def status_cmd(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Show the provider, account, scopes and expiry of the stored grant (never a token)."""
    with _guard(debug):
        cfg = _oauth_config(config)
        from prx_channel_email._oauth.flows import describe

        for key, value in asyncio.run(describe(cfg)):
            out.print(f"{key}: {escape(value)}")


@auth_app.command("logout")
def logout_cmd(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Revoke the stored grant where the provider supports it, and delete it."""
    _logging(debug, quiet=not debug)
    with _guard(debug):
        cfg = _oauth_config(config)
        from prx_channel_email._oauth.flows import logout

        for line in asyncio.run(logout(cfg)):
            out.print(escape(line))


app.add_typer(auth_app, name="auth")


# ---- the host framework's spelling: prx channel doctor email / prx channel run email

prx_app = typer.Typer(
    name="prx",
    help="Host-framework commands provided by prx-channel-email.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
channel_app = typer.Typer(help="Channel commands.", no_args_is_help=True)
channel_doctor = typer.Typer(help="Check a channel's setup.", no_args_is_help=True)
channel_run = typer.Typer(help="Run a channel with a handler.", no_args_is_help=True)
prx_app.add_typer(channel_app, name="channel")
channel_app.add_typer(channel_doctor, name="doctor")
channel_app.add_typer(channel_run, name="run")
channel_doctor.command("email")(doctor_cmd)
channel_run.command("email")(run_cmd)


def main() -> None:
    """Entry point of ``prx-email``."""
    app()


def prx_main() -> None:
    """Entry point of ``prx`` (``prx channel doctor email``, ``prx channel run email``)."""
    prx_app()


if __name__ == "__main__":  # pragma: no cover
    main()
