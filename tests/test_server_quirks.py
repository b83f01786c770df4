"""The compatibility matrix: receive, restart and reply through each server quirk.

Dovecot is the real server; :class:`~tests.servers.quirk_proxy.QuirkProxy` in front
of it behaves like Courier, Cyrus, Gmail or Exchange in one documented way at a
time (and all of Courier's at once). Each case: mail that was there before the
first start stays unread (``initial_sync="new"``), new mail is handed on and
moved to ``Processed``, the reply goes out threaded and its copy lands in the
Sent folder; after a restart the mail that came meanwhile is handed on first and
nothing earlier comes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email.channel import EmailChannel
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import ChannelMessage
from tests.integration_helpers import wait_until
from tests.outbound_helpers import ANN, dovecot_config, human_mail, parse
from tests.servers.dovecot import DovecotServer
from tests.servers.quirk_proxy import GMAIL_SENT, QuirkProxy
from tests.servers.smtp import SmtpServer
from tests.tools_helpers import seed, tools_config

COURIER_GREETING = "Courier-IMAP ready. Copyright 1998-2018 Double Precision, Inc."
# What Exchange Online stamps: no authserv-id, the verdicts straight away.
EXCHANGE_AUTHRES = (
    "Authentication-Results: spf=pass (sender IP is 192.0.2.7)"
    " smtp.mailfrom=people.example; dkim=pass (signature was verified)"
    " header.d=people.example;dmarc=pass action=none"
    " header.from=people.example;compauth=pass reason=100\r\n"
)


@dataclass(frozen=True)
class Case:
    quirks: frozenset[str] = frozenset()
    courier_layout: bool = False  # folders under "INBOX." with "." as delimiter
    greeting: str | None = None
    stamp: str = ""  # header the server's MTA puts on each delivered mail
    sent: str = "Sent"  # the folder the server marks \\Sent (created by the test)
    config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "no_uidnext": Case(frozenset({"no_uidnext"}), greeting=COURIER_GREETING),
    "no_uidnext_anywhere": Case(frozenset({"no_uidnext", "no_status_uidnext"})),
    "no_move": Case(frozenset({"no_move"})),
    "no_uidplus": Case(frozenset({"no_uidplus"})),
    "no_esearch": Case(frozenset({"no_esearch"})),
    "silent_idle": Case(frozenset({"silent_idle"}), greeting=COURIER_GREETING),
    "inbox_prefix": Case(courier_layout=True, sent="INBOX.Sent", config={"sent_folder": "Sent"}),
    "gmail": Case(frozenset({"gmail"}), sent=GMAIL_SENT),
    "exchange_authres": Case(
        stamp=EXCHANGE_AUTHRES,
        config={"sender_auth": "enforce", "trusted_authserv_ids": ["@none"]},
    ),
    "courier": Case(
        frozenset({"no_uidnext", "no_move", "no_esearch", "silent_idle"}),
        courier_layout=True,
        greeting=COURIER_GREETING,
        sent="INBOX.Sent",
    ),
}


class Rig:
    """One case's servers, account and channel config."""

    def __init__(
        self,
        tmp_path: Path,
        smtp: SmtpServer,
        server: DovecotServer,
        proxy: QuirkProxy,
        case: Case,
    ) -> None:
        self.server = server
        self.case = case
        self.account = server.add_user()
        self.proxy = proxy
        prefix = "INBOX." if case.courier_layout else ""
        self.processed = prefix + "Processed"
        server.create_folder(self.account, self.processed)
        server.create_folder(self.account, case.sent)
        self.config: EmailConfig = dovecot_config(
            tmp_path,
            smtp,
            server,
            self.account,
            imap_port=proxy.port,
            allowed_senders=[ANN],
            initial_sync="new",
            move_to_folder="Processed",  # bare: resolved by the server's namespace
            save_sent=True,
            keepalive_secs=1,  # silent IDLE: the keepalive pass finds the mail
            **case.config,
        )

    def deliver(self, mid: str, subject: str = "Question", body: str = "Hello?") -> None:
        raw = self.case.stamp.encode() + human_mail(mid, subject, body)
        self.server.deliver(self.account, raw, mail_from=ANN)


@pytest.fixture
def make_rig(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    dovecot_courier: DovecotServer,
    quirk_proxy: Callable[..., QuirkProxy],
) -> Callable[[Case], Rig]:
    def make(case: Case) -> Rig:
        server = dovecot_courier if case.courier_layout else dovecot
        proxy = quirk_proxy(server, case.quirks, greeting=case.greeting)
        return Rig(tmp_path, smtp_server, server, proxy, case)

    return make


async def _next(queue: asyncio.Queue[ChannelMessage]) -> ChannelMessage:
    return await asyncio.wait_for(queue.get(), timeout=30)


@pytest.mark.parametrize("name", sorted(CASES))
async def test_receive_restart_and_reply_through_each_quirk(
    name: str,
    make_rig: Callable[[Case], Rig],
    smtp_server: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="prx_channel_email")
    rig = make_rig(CASES[name])
    server, account = rig.server, rig.account
    rig.deliver("<old@people.example>", "Old", "before the first start")

    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(rig.config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await channel.wait_ready(30)
            rig.deliver("<q1@people.example>")
            first = await _next(queue)
            assert first.id == "<q1@people.example>"  # not the mail from before the start
            if rig.case.stamp:
                assert first.sender_verified is True
            await channel.send(first.reply("Here you go."))
            reply = parse(smtp_server.messages[-1].raw)
            assert reply["In-Reply-To"] == "<q1@people.example>"
            assert reply["Subject"] == "Re: Question"
            await wait_until(lambda: len(server.list_uids(account, rig.case.sent)) == 1, 30)
            await wait_until(lambda: len(server.list_uids(account, rig.processed)) == 1, 30)
            rig.deliver("<q2@people.example>")
            assert (await _next(queue)).id == "<q2@people.example>"
            moved = 2
            silent = [r for r in caplog.records if "imap.push_silent" in r.getMessage()]
            if "silent_idle" in rig.case.quirks:
                # Each came by a keepalive pass, IDLE announced none (the first may come
                # with the answer to a command instead): said once, with the fix.
                await wait_until(lambda: len(server.list_uids(account, rig.processed)) == 2, 30)
                rig.deliver("<q2b@people.example>")
                assert (await _next(queue)).id == "<q2b@people.example>"
                moved = 3
                assert channel.metrics.get("imap.push_missed") >= 2
                silent = [r for r in caplog.records if "imap.push_silent" in r.getMessage()]
                assert len(silent) == 1 and "IMAP_ENHANCEDIDLE=1" in silent[0].getMessage()
            else:
                assert not silent
            await wait_until(lambda: len(server.list_uids(account, rig.processed)) == moved, 30)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    # Restart: mail that came while the channel was down comes first, nothing earlier.
    rig.deliver("<q3@people.example>")
    queue = asyncio.Queue()
    async with EmailChannel(rig.config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            assert (await _next(queue)).id == "<q3@people.example>"
            rig.deliver("<q4@people.example>")
            fourth = await _next(queue)
            assert fourth.id == "<q4@people.example>"
            await channel.send(fourth.reply("Done."))
            await wait_until(lambda: len(server.list_uids(account, rig.processed)) == moved + 2, 30)
            # Moved, not only copied: without MOVE the copy is expunged after it.
            await wait_until(lambda: len(server.list_uids(account, "INBOX")) == 1, 30)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
    assert parse(smtp_server.messages[-1].raw)["In-Reply-To"] == "<q4@people.example>"
    # The old mail is still where it was, untouched by the channel.
    assert server.flags(account, "INBOX", server.list_uids(account, "INBOX")[0]) == set()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_mailbox_tools_search_without_uidnext(
    tmp_path: Path, dovecot: DovecotServer, quirk_proxy: Callable[..., QuirkProxy]
) -> None:
    """The agent's search pages down from the highest UID; on Courier (no UIDNEXT)
    it took -1 for it and found nothing, ever."""
    account = dovecot.add_user()
    shown = seed(dovecot, account).shown
    proxy = quirk_proxy(dovecot, {"no_uidnext"})
    config = tools_config(dovecot, account, tmp_path, imap_port=proxy.port)
    async with EmailChannel(config) as channel:
        found = await channel.tools.search("Invoice")
    assert {m["id"] for m in found["messages"]} == {shown["invoice"], shown["html"]}
