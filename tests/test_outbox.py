"""The outbox end to end against the SMTP fixture: threading, retries, failures, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._mail.message_ids import parse_id_list
from prx_channel_email._outbound import outbox as outbox_module
from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage.sqlite.outbox_table import OutboxTable
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import SendError
from prx_channel_email.models import ChannelMessage, SendMessage
from tests.outbound_helpers import ANN, dovecot_config, parse, seed_ledger, smtp_config
from tests.outbox_kill_child import KILL_AFTER_ACCEPT_ENV
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
    assert [r.lower() for r in smtp_server.messages[0].rcpt_tos] == [ANN]


async def test_an_explicit_recipient_is_never_redirected_by_a_reply_to(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """A parent's Reply-To (written by its sender) threads the reply but must not
    change who receives a message the framework addressed explicitly."""
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await seed_ledger(
            outbox.store,
            config,
            message_id="<p@p.example>",
            sender=ANN,
            reply_target="harvest@attacker.example",
            subject="Invoice",
        )
        await outbox.send(SendMessage(content="one", recipient=ANN))
        carol = "carol@people.example"
        await outbox.send(SendMessage(content="two", recipient=carol, in_reply_to="<p@p.example>"))
    first, second = smtp_server.messages
    assert first.rcpt_tos == (ANN,) and first.message()["To"] == ANN
    assert first.message()["In-Reply-To"] == "<p@p.example>"
    assert second.rcpt_tos == ("carol@people.example",)  # not the parent's sender either


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


# --- the outbox's own concurrency: leases, close, records, auth hold-off, cancellation ---


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition on state the test cannot get an event for (the DB)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def states(config: EmailConfig) -> list[str]:
    return [r["state"] for r in rows(config)]


def via_proxy(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy], **kw: Any
) -> tuple[EmailConfig, TcpProxy]:
    """A config whose SMTP traffic goes through a proxy the test can freeze mid-exchange."""
    p = proxy("127.0.0.1", smtp_server.tls_port)
    return smtp_config(tmp_path, smtp_server, smtp_port=p.port, **kw), p


async def test_exchange_outliving_the_lease_is_not_taken_back_and_sent_twice(
    tmp_path: Path,
    smtp_server: SmtpServer,
    proxy: Callable[[str, int], TcpProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live process never reclaims its own rows: not the one in a slow SMTP
    exchange, nor those queued behind it, however long past their lease."""
    monkeypatch.setattr(outbox_module, "MAX_IDLE_WAIT_SECS", 0.05)  # the worker looks often
    config, p = via_proxy(tmp_path, smtp_server, proxy)
    async with running_outbox(config, lease_secs=0.2) as outbox:
        p.freeze()  # the server stalls mid-exchange
        sends = [
            asyncio.create_task(outbox.send(SendMessage(content=f"n{i}", recipient=ANN)))
            for i in range(3)
        ]
        await p.await_connections(1, timeout=5)
        await until(lambda: len(rows(config)) == 3)
        await asyncio.sleep(0.6)  # three leases pass; the worker is free to look
        p.thaw()
        ids = await asyncio.wait_for(asyncio.gather(*sends), timeout=10)
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 3, 0.3)
    assert sorted(m.message()["Message-ID"] for m in smtp_server.messages) == sorted(ids)
    assert [(r["state"], r["attempts"]) for r in rows(config)] == [("sent", 1)] * 3


async def test_close_waits_for_the_exchange_in_flight_and_records_it(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    config, p = via_proxy(tmp_path, smtp_server, proxy)
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), retry_base_secs=0.02, lease_secs=0.5)
        await outbox.start()
        p.freeze()
        first = asyncio.create_task(outbox.send(SendMessage(content="in flight", recipient=ANN)))
        await p.await_connections(1, timeout=5)
        second = asyncio.create_task(outbox.send(SendMessage(content="queued", recipient=ANN)))
        await until(lambda: len(rows(config)) == 2)
        closing = asyncio.create_task(outbox.close())
        await asyncio.sleep(0)  # close() has begun
        p.thaw()
        in_flight = await asyncio.wait_for(first, timeout=10)
        queued = await asyncio.wait_for(second, timeout=10)  # durably queued: no error
        await asyncio.wait_for(closing, timeout=10)
        # Right after close(): the accepted one is recorded, the other waits for next time.
        assert states(config) == ["sent", "pending"]
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [in_flight]
    async with running_outbox(config) as outbox:
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 2, 0.3)
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [in_flight, queued]
    assert states(config) == ["sent", "sent"]


async def test_send_after_close_is_refused(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server)
    async with running_outbox(config) as outbox:
        await outbox.close()
        with pytest.raises(SendError) as info:
            await outbox.send(SendMessage(content="too late", recipient=ANN))
        assert info.value.code == "closed"
    assert rows(config) == []
    assert smtp_server.messages == []


async def test_failed_sent_record_is_kept_and_not_resent(
    tmp_path: Path, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = smtp_config(tmp_path, smtp_server)
    real = OutboxTable._mark_sent
    failures = [sqlite3.OperationalError("database is locked")]

    def flaky(conn: sqlite3.Connection, rows: list[Any]) -> None:
        if rows and failures:
            raise failures.pop()
        real(conn, rows)

    monkeypatch.setattr(OutboxTable, "_mark_sent", staticmethod(flaky))
    async with running_outbox(config, lease_secs=0.2) as outbox:
        await outbox.send(SendMessage(content="once", recipient=ANN))
        await outbox.pending()  # writes "sent": fails this once
        assert failures == []
        # Leases run out several times over; the row must not look abandoned.
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 1, 0.8)
        await asyncio.wait_for(outbox.wait_idle(), timeout=5)
    assert [(r["state"], r["attempts"]) for r in rows(config)] == [("sent", 1)]


async def test_concurrent_sends_with_a_bad_password_log_in_once(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, password="not-the-password")
    async with running_outbox(config) as outbox:
        results = await asyncio.gather(
            *(outbox.send(SendMessage(content=f"x{i}", recipient=ANN)) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, SendError) and r.code == "auth_failed" for r in results)
        assert len(smtp_server.auth_attempts) == 1
        assert await outbox.requeue_failed() == 0  # refused logins stay failed
    assert smtp_server.messages == []
    got = sorted((r["state"], r["attempts"], r["smtp_code"]) for r in rows(config))
    # One real attempt (535); the others never tried, so they used no attempt.
    assert got == [("failed", 0, None)] * 4 + [("failed", 1, 535)]


async def test_worker_row_during_auth_holdoff_uses_no_attempt(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    config, p = via_proxy(tmp_path, smtp_server, proxy, password="not-the-password")
    async with running_outbox(config) as outbox:
        p.freeze()
        first = asyncio.create_task(outbox.send(SendMessage(content="a", recipient=ANN)))
        await p.await_connections(1, timeout=5)

        def queue_earlier_reply(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "INSERT INTO outbox (account, message_id, mail_from, recipient, raw, state,"
                " attempts, next_attempt_at, created_at, updated_at)"
                " VALUES (?, '<b@x.example>', ?, ?, ?, 'pending', 0, ?, ?, ?)",
                (
                    config.account,
                    config.from_address,
                    ANN,
                    b"Subject: b\r\n\r\nb\r\n",
                    now,
                    now,
                    now,
                ),
            )

        await outbox.store.run(queue_earlier_reply)
        outbox._wake.set()
        # The worker claims it and waits for its turn behind the stalled login.
        await until(lambda: states(config)[-1] == "sending")
        p.thaw()
        with pytest.raises(SendError) as info:
            await asyncio.wait_for(first, timeout=10)
        assert info.value.code == "auth_failed"
        await until(lambda: states(config)[-1] == "pending")
    assert len(smtp_server.auth_attempts) == 1
    row = rows(config)[-1]
    assert row["message_id"] == "<b@x.example>" and row["attempts"] == 0


async def test_requeue_failed_revives_only_exhausted_replies(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server, send_max_attempts=2)
    smtp_server.script_rcpt(["451 4.3.0 try later"] * 2)
    smtp_server.reject_recipient("gone@people.example", "550 5.1.1 mailbox unavailable")
    async with running_outbox(config) as outbox:
        mid = await outbox.send(SendMessage(content="outage", recipient=ANN))
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        with pytest.raises(SendError):
            await outbox.send(SendMessage(content="x", recipient="gone@people.example"))
        [exhausted, permanent] = rows(config)
        assert exhausted["state"] == "failed" and exhausted["attempts"] == 2
        assert exhausted["last_error"].startswith("gave up after 2 attempt(s)")
        assert permanent["state"] == "failed" and permanent["smtp_code"] == 550
        assert smtp_server.messages == []

        assert await outbox.requeue_failed() == 1
        await asyncio.wait_for(outbox.wait_idle(), timeout=10)
    [got] = smtp_server.messages
    assert got.message()["Message-ID"] == mid
    assert states(config) == ["sent", "failed"]


async def test_send_cancelled_before_its_attempt_is_delivered_promptly(
    tmp_path: Path, smtp_server: SmtpServer, proxy: Callable[[str, int], TcpProxy]
) -> None:
    """A cancelled send() is still delivered (see its docstring), soon, not after the lease."""
    config, p = via_proxy(tmp_path, smtp_server, proxy)
    async with running_outbox(config, lease_secs=60) as outbox:
        p.freeze()
        first = asyncio.create_task(outbox.send(SendMessage(content="a", recipient=ANN)))
        await p.await_connections(1, timeout=5)
        second = asyncio.create_task(outbox.send(SendMessage(content="b", recipient=ANN)))
        await until(lambda: len(rows(config)) == 2)  # stored, waiting for its turn
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        p.thaw()
        await asyncio.wait_for(first, timeout=10)
        await smtp_server.await_messages(2, timeout=5)
        await asyncio.wait_for(outbox.wait_idle(), timeout=5)
        await asyncio.to_thread(smtp_server.assert_no_more_messages, 2, 0.2)
    assert states(config) == ["sent", "sent"]


async def test_queued_reply_waits_out_a_refused_login_instead_of_failing(
    tmp_path: Path,
    smtp_server: SmtpServer,
    proxy: Callable[[str, int], TcpProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reply already queued (after a temporary failure) meets a login the account
    can no longer make. Nobody is waiting on that send() to hear about it, so failing
    the row would lose the reply: it waits, attempts unchanged, and goes out once the
    login works again."""
    monkeypatch.setattr(outbox_module, "AUTH_WAIT_SECS", 0.2)
    config, p = via_proxy(tmp_path, smtp_server, proxy, send_retry_max_secs=1)
    smtp_server.script_rcpt(["451 4.3.0 try later"])
    async with running_outbox(config, retry_base_secs=1.0) as outbox:
        await outbox.send(SendMessage(content="queued", recipient=ANN))  # queued, not sent
        assert [(r["state"], r["attempts"]) for r in rows(config)] == [("pending", 1)]
        smtp_server.set_credentials(smtp_server.username, "rotated-by-the-admin")
        p.cut()  # the retry must log in again
        await until(lambda: len(smtp_server.auth_attempts) >= 2, timeout=10)
        assert not smtp_server.auth_attempts[-1].success
        await until(lambda: outbox.healthy is False)
        # The worker keeps trying, re-claiming the row each time ('sending' while it
        # tries): read at any moment, it waits, never failed, no attempt counted.
        await until(lambda: len(smtp_server.auth_attempts) >= 3, timeout=10)
        row = rows(config)[0]
        assert row["state"] in ("pending", "sending") and row["attempts"] == 1, row
        smtp_server.set_credentials(smtp_server.username, config.password.get_secret_value())
        await asyncio.wait_for(outbox.wait_idle(), timeout=15)
    assert [(r["state"], r["attempts"]) for r in rows(config)] == [("sent", 2)]
    assert len(smtp_server.messages) == 1
