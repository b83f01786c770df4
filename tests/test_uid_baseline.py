"""The UID baseline comes from what the server really has, never from a missing UIDNEXT.

Courier answers SELECT without ``[UIDNEXT]``; it was read as 0, the first start
stored a cursor of -1 and every later pass sent ``UID SEARCH UID 0:*``, which
Courier refuses: the channel never delivered a mail there. These tests run
through the quirk proxy (which refuses UID 0 the way Courier does).
"""

from __future__ import annotations

import asyncio
import imaplib
import time
from collections.abc import Callable
from pathlib import Path

from prx_channel_email._net.imap import Namespace, folder_candidates, push_fix, uid_set
from prx_channel_email._storage import Cursor, Mailbox
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email.channel import EmailChannel
from prx_channel_email.models import ChannelMessage
from tests.outbound_helpers import ANN, dovecot_config, human_mail
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.quirk_proxy import QuirkProxy
from tests.servers.smtp import SmtpServer


def _append_dated(server: DovecotServer, account: Account, raw: bytes, when: float) -> None:
    """APPEND with an INTERNALDATE in the past (mail that was there long before)."""
    with imaplib.IMAP4(server.host, server.imap_port, timeout=10) as imap:
        imap.login(account.username, account.password)
        imap.append("INBOX", "", imaplib.Time2Internaldate(when), raw)


async def _next(queue: asyncio.Queue[ChannelMessage]) -> str:
    return (await asyncio.wait_for(queue.get(), timeout=30)).id


async def test_a_stored_minus_one_cursor_is_repaired_without_handing_on_old_mail(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    """The state an earlier release left on Courier: cursor -1. The mail that arrived
    while it was stalled is handed on; the mail from before its first start is not."""
    proxy = quirk_proxy(dovecot, {"no_uidnext"})
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account, imap_port=proxy.port,
        allowed_senders=[ANN], initial_sync="new", keepalive_secs=2,
    )  # fmt: skip
    _append_dated(
        dovecot, account, human_mail("<old@people.example>", "Old", "x"), time.time() - 3 * 86400
    )
    async with StateStore(config.state_dir) as store:
        await store.set_cursor(
            Mailbox(config.account, "INBOX"), Cursor(dovecot.uidvalidity(account), -1)
        )
    dovecot.deliver(account, human_mail("<stalled@people.example>", "Hi", "x"), mail_from=ANN)

    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            assert await _next(queue) == "<stalled@people.example>"
            dovecot.deliver(account, human_mail("<new@people.example>", "Hi", "y"), mail_from=ANN)
            assert await _next(queue) == "<new@people.example>"
            assert channel.metrics.get("imap.cursor_repairs") == 1
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    async with StateStore(config.state_dir) as store:
        cursor = await store.get_cursor(Mailbox(config.account, "INBOX"))
    assert cursor is not None and cursor.last_uid == max(dovecot.list_uids(account))


async def test_a_new_uidvalidity_is_baselined_without_uidnext(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
    quirk_proxy: Callable[..., QuirkProxy],
) -> None:
    """The re-baseline after a UIDVALIDITY change had the same flaw as the first start."""
    proxy = quirk_proxy(dovecot, {"no_uidnext", "no_status_uidnext"})
    dovecot.create_folder(account, "Work")
    config = dovecot_config(
        tmp_path, smtp_server, dovecot, account, imap_port=proxy.port, imap_folder="Work",
        allowed_senders=[ANN], initial_sync="new", keepalive_secs=1,
    )  # fmt: skip
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await channel.wait_ready(30)
            dovecot.deliver(
                account, human_mail("<w1@people.example>", "Hi", "x"), "Work", mail_from=ANN
            )
            assert await _next(queue) == "<w1@people.example>"
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    dovecot.recreate_folder(account, "Work")
    dovecot.deliver(account, human_mail("<w2@people.example>", "Hi", "x"), "Work", mail_from=ANN)
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            assert await _next(queue) == "<w2@people.example>"  # rechecked by date
            dovecot.deliver(
                account, human_mail("<w3@people.example>", "Hi", "x"), "Work", mail_from=ANN
            )
            assert await _next(queue) == "<w3@people.example>"  # the baseline holds
            assert channel.metrics.get("imap.uidvalidity_changes") == 1
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


def test_no_uid_set_names_uid_zero() -> None:
    assert uid_set([0, 1, 2, 5]) == "1:2,5"
    assert uid_set([0]) == ""


def test_folder_names_follow_the_personal_namespace() -> None:
    courier = Namespace("INBOX.", ".")
    assert folder_candidates("Processed", courier) == ["Processed", "INBOX.Processed"]
    assert folder_candidates("Archive/2026", courier) == [
        "Archive/2026",
        "Archive.2026",
        "INBOX.Archive.2026",
    ]
    assert folder_candidates("INBOX.Processed", courier) == ["INBOX.Processed"]
    cyrus = Namespace("INBOX/", "/")
    assert folder_candidates("Processed", cyrus) == ["Processed", "INBOX/Processed"]
    assert folder_candidates("Processed", Namespace("", "/")) == ["Processed"]


def test_the_push_fix_names_the_server_setting() -> None:
    assert "idled" in push_fix("* OK server ready Cyrus IMAP 3.6.1-Debian")
    assert "IMAP_ENHANCEDIDLE=1" in push_fix("* OK Courier-IMAP ready.")
    assert "keepalive_secs" in push_fix("* OK Dovecot ready.")
