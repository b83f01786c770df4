"""The doctor's checks of what servers do differently: folder names and push.

Folders are named by the server's rules (``ImapSession.resolve_folder``, the
code the channel itself uses), so the doctor says exactly what the channel will
do with ``move_to_folder = "Processed"`` on Courier (``INBOX.Processed``), and
offers the exact name to use when a folder does not exist.

Push is measured, not assumed (``--push-test``): a marked message is APPENDed to
the watched folder from a second connection while the first one IDLEs, the
untagged ``EXISTS`` is timed, and the message is deleted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import secrets
import time
from collections.abc import Awaitable, Callable

from prx_channel_email._net.imap import ImapSession, push_fix
from prx_channel_email.config import EmailConfig
from prx_channel_email.doctor.report import Status

PUSH_HEADER = "X-Prx-Push-Test"
CheckResult = tuple[Status, str, str | None]


def configured_folders(config: EmailConfig) -> list[tuple[str, str]]:
    """(setting, name) of each folder the config names besides ``imap_folder``."""
    out: list[tuple[str, str]] = []
    for name in getattr(config, "imap_folders", None) or []:
        if name != config.imap_folder and ("imap_folders", name) not in out:
            out.append(("imap_folders", name))
    if config.move_to_folder:
        out.append(("move_to_folder", config.move_to_folder))
    if config.sent_folder:
        out.append(("sent_folder", config.sent_folder))
    return out


def closest_folder(name: str, folders: list[str], delimiter: str) -> str | None:
    """The existing folder a person most likely meant (case, or the last level)."""
    wanted = name.lower()
    leaf = name.replace("/", delimiter or "/").split(delimiter or "/")[-1].lower()
    for folder in folders:
        if folder.lower() == wanted:
            return folder
    for folder in folders:
        if delimiter and folder.split(delimiter)[-1].lower() == leaf:
            return folder
    return None


async def folders_check(config: EmailConfig, session: ImapSession) -> CheckResult:
    """Each configured folder exists, under the name the server gives it."""
    wanted = configured_folders(config)
    if config.save_sent and not config.sent_folder:
        sent = await session.find_special_use("\\Sent")
        if sent is None:
            named = [f for f in await session.list_folders() if f.lower() == "sent"]
            sent = named[0] if named else None
        if sent is None:
            return (
                "warn",
                "save_sent is on, but the server marks no folder \\Sent and none is named Sent",
                "set sent_folder to the folder replies should be copied to.",
            )
    if not wanted:
        return "pass", "no other folders configured (move_to_folder, sent_folder)", None
    found: list[str] = []
    missing: list[str] = []
    fixes: list[str] = []
    folders: list[str] | None = None
    ns = await session.namespace()
    for key, name in wanted:
        resolved = await session.resolve_folder(name)
        if await session.folder_exists(resolved):
            found.append(f"{key} {name!r}" + (f" is {resolved!r}" if resolved != name else ""))
            continue
        if folders is None:
            folders = await session.list_folders()
        missing.append(f"{key} {name!r} does not exist")
        close = closest_folder(name, folders, ns.delimiter)
        if close is not None:
            fixes.append(f'set {key} = "{close}"')
        else:
            fixes.append(f'create the folder "{resolved}" (that is its name on this server)')
    if missing:
        shown = ", ".join(folders or []) or "(none)"
        return (
            "fail",
            "; ".join(missing + found),
            "; ".join(fixes) + f". Folders on the server: {shown}",
        )
    return "pass", "; ".join(found) + " (all exist)", None


async def push_check(
    config: EmailConfig,
    watcher: ImapSession,
    folder: str,
    open_second: Callable[[], Awaitable[ImapSession]],
    budget: float,
) -> CheckResult:
    """IDLE on ``watcher`` (``folder`` selected), APPEND a marked message from a second
    session, time the EXISTS, delete the message."""
    token = secrets.token_hex(8)
    domain = config.from_address.rpartition("@")[2] or "localhost"
    raw = (
        f"From: {config.from_address}\r\nTo: {config.from_address}\r\n"
        f"Subject: prx-email doctor push test\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <push-{token}@{domain}>\r\n"
        "Auto-Submitted: auto-generated\r\n"
        f"{PUSH_HEADER}: {token}\r\n\r\n"
        "Sent by prx-email doctor --push-test, and deleted again at once.\r\n"
    ).encode()
    second = await open_second()
    try:
        watcher.changed.clear()
        await watcher.idle_start()
        started = time.monotonic()
        await second.append(folder, raw, ("\\Seen", "\\Deleted"))
        pushed = await watcher.idle_wait(budget)
        elapsed = time.monotonic() - started
        await watcher.idle_done(budget)
        cleaned = await _delete_marked(second, folder, token)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(second.logout(), 2)
    left = (
        ""
        if cleaned
        else " (the test message is left flagged \\Deleted: without UIDPLUS only a plain "
        "EXPUNGE could remove it, which would remove other deleted mail too)"
    )
    if pushed:
        shown = f"{elapsed:.2f}" if elapsed < 1 else f"{elapsed:.1f}"
        return "pass", f"push works ({shown} s){left}", None
    return (
        "warn",
        f"the server advertises IDLE but announced a new message not within {budget:g} s{left}",
        f"{push_fix(watcher.greeting)}. Until then the channel sees new mail at its "
        f"keepalive check, every {config.keepalive_secs} s.",
    )


async def _delete_marked(session: ImapSession, folder: str, token: str) -> bool:
    await session.select(folder)
    uids = await session.uid_search("HEADER", PUSH_HEADER, token)
    if not uids:
        return True
    await session.store_flags(uids, "(\\Deleted)")
    if "UIDPLUS" not in session.capabilities:
        return False
    await session.uid_expunge(uids)
    return True
