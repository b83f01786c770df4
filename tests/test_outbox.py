"""The outbox end to end against the SMTP fixture: threading, retries, failures, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import SendError
from prx_channel_email.message_ids import parse_id_list
from prx_channel_email.models import ChannelMessage, SendMessage
from prx_channel_email.observability import Metrics
from prx_channel_email.outbox import KILL_AFTER_ACCEPT_ENV, Outbox
from prx_channel_email.store import DB_NAME, StateStore
from tests.outbound_helpers import ANN, dovecot_config, parse, seed_ledger, smtp_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.proxy import TcpProxy
from tests.servers.smtp import SmtpServer

FAST = {"retry_base_secs": 0.02, "lease_secs": 0.5}


@asynccontextmanager
async def running_outbox(config: EmailConfig, **kw: Any) -> AsyncIterator[Outbox]:
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), **{**FAST, **kw})
        await outbox.start()
        try:
            yield outbox
        finally:
            await outbox.close()


def rows(config: EmailConfig) -> list[dict[str, Any]]:
    with sqlite3.connect(config.state_dir / DB_NAME) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")]


async def test_reply_to_received_message_is_threaded(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await seed_ledger(
            outbox.store,
            config,
            message_id="<q2@people.example>",
            sender=ANN,
            reply_target="ann.replies@people.example",
            subject="RE: Re: Quarterly numbers",
            references=["<q0@people.example>", "<q1@people.example>"],
        )
        received = ChannelMessage(
            id="<q2@people.example>",
            sender=ANN,
            reply_target="ann.replies@people.example",
            subject="RE: Re: Quarterly numbers",
            timestamp=0,
            thread_ts="<q0@people.example>",
        )
        mid = await outbox.send(received.reply("Here they are: **42**."))
    [got] = smtp_server.messages
    msg = got.message()
    assert got.rcpt_tos == ("ann.replies@people.example",)
    assert msg["To"] == "ann.replies@people.example"
    assert msg["Message-ID"] == mid
    assert msg["In-Reply-To"] == "<q2@people.example>"
    assert parse_id_list(msg["References"]) == [
        "<q0@people.example>",
        "<q1@people.example>",
        "<q2@people.example>",
    ]
    assert msg["Subject"] == "Re: Quarterly numbers"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["From"] == config.from_address
    assert msg["Date"] is not None and msg["MIME-Version"] == "1.0"
    html = msg.get_body(("html",))
    assert html is not None and "<strong>42</strong>" in html.get_content()
    assert [r["state"] for r in rows(config)] == ["sent"]


async def test_content_and_recipient_only_threads_onto_latest_from_them(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await seed_ledger(
            outbox.store,
            config,
            message_id="<old@p.example>",
            sender=ANN,
            subject="Old",
            received_at=1000,
        )
        await seed_ledger(
            outbox.store,
            config,
            message_id="<new@p.example>",
            sender=ANN,
            subject="New",
            received_at=2000,
        )
        await seed_ledger(
            outbox.store,
            config,
            message_id="<other@p.example>",
            sender="bob@people.example",
            subject="Bob's",
            received_at=3000,
        )
        await outbox.send(SendMessage(content="answer", recipient="ANN@people.example"))
    msg = smtp_server.messages[0].message()
    assert msg["In-Reply-To"] == "<new@p.example>"
    assert msg["Subject"] == "Re: New"
    assert smtp_server.messages[0].rcpt_tos == (ANN,)


async def test_thread_ts_threads_onto_latest_in_that_conversation(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await seed_ledger(
            outbox.store,
            config,
            message_id="<root@p.example>",
            sender=ANN,
            subject="Plan",
            received_at=1,
        )
        await seed_ledger(
            outbox.store,
            config,
            message_id="<later@p.example>",
            sender=ANN,
            subject="Re: Plan",
            references=["<root@p.example>"],
            received_at=2,
        )
        await seed_ledger(
            outbox.store,
            config,
            message_id="<unrelated@p.example>",
            sender=ANN,
            subject="Other",
            received_at=3,
        )
        await outbox.send(SendMessage(content="ok", recipient=ANN, thread_ts="<root@p.example>"))
    msg = smtp_server.messages[0].message()
    assert msg["In-Reply-To"] == "<later@p.example>"
    assert parse_id_list(msg["References"]) == ["<root@p.example>", "<later@p.example>"]
    assert msg["Subject"] == "Re: Plan"


async def test_new_conversation_uses_default_subject(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, default_subject="A note from your assistant")
    async with running_outbox(config) as outbox:
        await outbox.send(SendMessage(content="hello", recipient="new.person@people.example"))
    msg = smtp_server.messages[0].message()
    assert msg["Subject"] == "A note from your assistant"
    assert msg["In-Reply-To"] is None and msg["References"] is None


async def test_two_451_then_accept_delivers_exactly_once(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.script_data(["451 4.3.0 try again later", "451 4.3.0 still busy"])
    async with running_outbox(config) as outbox:
        mid = await outbox.send(SendMessage(content="persistent", recipient=ANN))
        # send() returned after the first 451: the message is durably queued.
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        smtp_server.assert_no_more_messages(1, within=0.3)
        [got] = smtp_server.messages
        assert got.message()["Message-ID"] == mid
        assert outbox.metrics.get("outbound.retries") == 2
    [row] = rows(config)
    assert row["state"] == "sent" and row["attempts"] == 3
    assert smtp_server.pending_script("DATA") == []


async def test_550_is_a_permanent_error_and_never_retried(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.reject_recipient("gone@people.example", "550 5.1.1 mailbox unavailable")
    async with running_outbox(config) as outbox:
        with pytest.raises(SendError) as info:
            await outbox.send(SendMessage(content="x", recipient="gone@people.example"))
        err = info.value
        assert err.smtp_code == 550 and err.recipient == "gone@people.example"
        assert err.code == "recipient_refused"
        assert err.message_id is not None and "mailbox unavailable" in str(err)
        smtp_server.assert_no_more_messages(0, within=0.3)
        assert await outbox.pending() == 0
    [row] = rows(config)
    assert row["state"] == "failed" and row["smtp_code"] == 550 and row["attempts"] == 1
    assert "mailbox unavailable" in row["last_error"]


async def test_data_550_is_permanent(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.script_data(["554 5.7.1 message refused"])
    async with running_outbox(config) as outbox:
        with pytest.raises(SendError) as info:
            await outbox.send(SendMessage(content="x", recipient=ANN))
    assert info.value.smtp_code == 554
    assert [r["state"] for r in rows(config)] == ["failed"]


async def test_failed_login_is_clear_and_does_not_storm(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, password="not-the-password")
    async with running_outbox(config) as outbox:
        with pytest.raises(SendError) as info:
            await outbox.send(SendMessage(content="x", recipient=ANN))
        assert info.value.code == "auth_failed"
        assert "refused the login" in str(info.value)
        assert "not-the-password" not in str(info.value)
        assert outbox.healthy is False
        # Further sends fail at once without another login attempt.
        for _ in range(3):
            with pytest.raises(SendError) as again:
                await outbox.send(SendMessage(content="y", recipient=ANN))
            assert again.value.code == "auth_failed"
    assert len(smtp_server.auth_attempts) == 1
    assert smtp_server.messages == []


async def test_retries_stop_at_the_configured_limit(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, send_max_attempts=2)
    smtp_server.script_rcpt(["451 4.7.1 greylisted"] * 5)
    async with running_outbox(config) as outbox:
        await outbox.send(SendMessage(content="x", recipient=ANN))
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
    [row] = rows(config)
    assert row["state"] == "failed" and row["attempts"] == 2 and row["smtp_code"] == 451
    assert smtp_server.pending_script("RCPT") == ["451 4.7.1 greylisted"] * 3


async def test_pending_mail_survives_restart(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy("127.0.0.1", smtp_server.tls_port)
    down = smtp_config(
        tmp_path, smtp_server, smtp_port=p.port, connect_timeout_secs=0.3, command_timeout_secs=0.3
    )
    p.freeze()  # the server is unreachable during the first run
    async with running_outbox(down, retry_base_secs=60) as outbox:
        mid = await outbox.send(SendMessage(content="while down", recipient=ANN))
        assert outbox.healthy is False
        assert await outbox.pending() == 1
    assert smtp_server.messages == []
    up = smtp_config(tmp_path, smtp_server)  # same state_dir, reachable server
    async with running_outbox(up, retry_base_secs=60) as outbox:
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
    [got] = smtp_server.messages
    assert got.message()["Message-ID"] == mid
    assert [r["state"] for r in rows(up)] == ["sent"]


async def test_drop_after_accept_resends_same_message_id(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """The server took the message but the 250 never arrived: the retry is byte-identical."""
    config = smtp_config(tmp_path, smtp_server)
    smtp_server.drop_after_data(1)
    async with running_outbox(config) as outbox:
        mid = await outbox.send(SendMessage(content="once", recipient=ANN))
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
    first, second = smtp_server.messages
    assert first.raw == second.raw
    assert first.message()["Message-ID"] == second.message()["Message-ID"] == mid


async def test_bad_input_is_rejected_before_anything_is_stored(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        for bad in (
            SendMessage(content="x", recipient=ANN, subject="hi\r\nBcc: victim@evil.example"),
            SendMessage(content="x", recipient=f"{ANN}\r\nBcc: victim@evil.example"),
            SendMessage(content="x", recipient="no-at-sign"),
            SendMessage(content="x", recipient=ANN, attachments=[tmp_path / "missing.pdf"]),
        ):
            with pytest.raises(SendError):
                await outbox.send(bad)
    assert rows(config) == []
    assert smtp_server.messages == []


async def test_concurrent_burst_is_delivered_once_each(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    p = proxy("127.0.0.1", smtp_server.starttls_port)
    config = smtp_config(tmp_path, smtp_server, security="starttls", smtp_port=p.port)
    async with running_outbox(config) as outbox:
        ids = await asyncio.gather(
            *(outbox.send(SendMessage(content=f"n{i}", recipient=ANN)) for i in range(20))
        )
    got = sorted(m.message()["Message-ID"] for m in smtp_server.messages)
    assert got == sorted(ids) and len(set(ids)) == 20
    assert p.connections_accepted == 1


async def test_killed_between_acceptance_and_recording_resends_same_id(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    spec = json.loads(config.model_dump_json(exclude={"password", "smtp_password"}))
    spec["password"] = config.password.get_secret_value() if config.password else ""
    spec["recipient"] = ANN
    env = {**os.environ, KILL_AFTER_ACCEPT_ENV: "1"}
    for key in [k for k in env if k.startswith("PRX_EMAIL_") and k != KILL_AFTER_ACCEPT_ENV]:
        del env[key]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.outbox_kill_child",
        json.dumps(spec),
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode == -9, (out, err)
    [first] = smtp_server.messages
    [row] = rows(config)
    assert row["state"] == "sending"  # accepted by the server, but never recorded as sent

    async with running_outbox(config) as outbox:
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
    first, second = smtp_server.messages
    assert second.message()["Message-ID"] == first.message()["Message-ID"]
    assert second.raw == first.raw
    assert [r["state"] for r in rows(config)] == ["sent"]


async def test_sent_reply_is_saved_to_the_special_use_sent_folder(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    config = dovecot_config(tmp_path, smtp_server, dovecot, account, save_sent=True)
    dovecot.create_folder(account, "Sent")  # Dovecot marks it \Sent (SPECIAL-USE)
    assert dovecot.list_uids(account, "Sent") == []
    async with running_outbox(config) as outbox:
        mid = await outbox.send(SendMessage(content="for the record", recipient=ANN))
    # close() waited for the copy; it is in the folder marked \Sent, flagged \Seen.
    [uid] = dovecot.list_uids(account, "Sent")
    [delivered] = smtp_server.messages
    stored = dovecot.fetch_raw(account, "Sent", uid)
    assert stored.replace(b"\r\n", b"\n") == delivered.raw.replace(b"\r\n", b"\n")
    assert parse(delivered.raw)["Message-ID"] == mid
    assert "\\Seen" in dovecot.flags(account, "Sent", uid)
    assert outbox.metrics.get("outbound.saved_to_sent") == 1


async def test_missing_sent_folder_is_logged_not_resent(
    tmp_path: Path, smtp_server: SmtpServer, dovecot: DovecotServer, account: Account
) -> None:
    config = dovecot_config(tmp_path, smtp_server, dovecot, account, save_sent=True)
    async with running_outbox(config) as outbox:
        await outbox.send(SendMessage(content="no Sent folder here", recipient=ANN))
    assert outbox.metrics.get("outbound.save_sent_failed") == 1
    assert len(smtp_server.messages) == 1
    assert [r["state"] for r in rows(config)] == ["sent"]


async def test_attachment_goes_through_the_outbox(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server)
    chart = tmp_path / "chart.png"
    chart.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    async with running_outbox(config) as outbox:
        await outbox.send(SendMessage(content="the chart", recipient=ANN, attachments=[chart]))
    [part] = list(smtp_server.messages[0].message().iter_attachments())
    assert part.get_filename() == "chart.png"
    assert part.get_content() == chart.read_bytes()
