"""The operations endpoint (``metrics_port``): /metrics, /healthz and /status read over
real HTTP from a channel on the real Dovecot and SMTP fixtures, and from ``prx-email run``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prx_channel_email import (
    ChannelError,
    ChannelMessage,
    ChannelState,
    EmailChannel,
    MailboxStatus,
)
from prx_channel_email._ops import http as ops_http
from prx_channel_email._ops.prometheus import ChannelCollector, CounterSet, make_registry, render
from prx_channel_email.config import config_from_table
from tests.integration_helpers import mail, wait_until
from tests.operator_helpers import reaped, subprocess_env
from tests.servers.dovecot import Account, DovecotServer, free_ports
from tests.servers.smtp import SmtpServer
from tests.test_cli import start_run, write_config
from tests.test_doctor import make_table
from tests.test_readiness import GENEROUS, listening

ALICE = "alice@example.test"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:  # fmt: skip
    return page.get((name, tuple(sorted(labels.items()))))


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=GENEROUS) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read the whole answer (the server closes after one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), GENEROUS)
    finally:
        writer.close()


@pytest.fixture
def table(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, tmp_path: Path
) -> dict[str, Any]:
    return make_table(dovecot, account, smtp_server, tmp_path, sender_auth="off",
                      metrics_port=free_ports(1)[0])  # fmt: skip


async def test_metrics_count_what_a_mailbox_did_and_healthz_says_it_serves(
    dovecot: DovecotServer, account: Account, smtp_server: SmtpServer, table: dict[str, Any]
) -> None:
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    channel = EmailChannel(config_from_table(table))
    async with channel:
        listener = asyncio.create_task(channel.listen(queue))
        try:
            await channel.wait_ready(GENEROUS)
            port = channel.metrics_port
            assert port == table["metrics_port"]
            health = await get(port, "/healthz")
            assert health.status_code == 200, health.text
            assert health.json() == {"healthy": True, "mailboxes": 1, "unhealthy": []}

            await dovecot.adeliver(account, mail("<m1@example.test>", "q", "hello", sender=ALICE))
            await dovecot.adeliver(
                account, mail("<m2@example.test>", "spam", "buy", sender="mallory@evil.example")
            )
            msg = await asyncio.wait_for(queue.get(), GENEROUS)
            await channel.send(msg.reply("an answer"))  # returns once SMTP accepted it
            await wait_until(lambda: channel.stats().get("inbound.skipped.not_allowed", 0) == 1)

            response = await get(port, "/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            page = samples(response.text)
            box = {"account": "default", "folder": "INBOX"}
            assert value(page, "prx_email_mailbox_up", **box) == 1
            assert value(page, "prx_email_messages_delivered_total", **box) == 1
            assert value(page, "prx_email_messages_refused_total", account="default",
                         reason="not_allowed") == 1  # fmt: skip
            assert value(page, "prx_email_replies_sent_total", account="default") == 1
            assert value(page, "prx_email_outbox_pending", account="default") == 0
            assert (value(page, "prx_email_imap_connects_total", **box) or 0) >= 1
            # The process's own figures come from this channel's registry too.
            assert (value(page, "process_resident_memory_bytes") or 0) > 0

            status = await get(port, "/status")
            (row,) = status.json()
            assert (row["account"], row["folder"], row["state"]) == ("default", "INBOX",
                                                                     "connected")  # fmt: skip
            assert row["last_message_at"] is not None
        finally:
            listener.cancel()
    # Closed: the port is free again.
    with pytest.raises(httpx.ConnectError):
        await get(table["metrics_port"], "/healthz")


async def test_healthz_is_503_and_names_the_failed_mailbox_and_its_code(
    table: dict[str, Any],
) -> None:
    table["imap_folder"] = "NoSuchFolder"
    async with listening(table) as channel:
        with pytest.raises(ChannelError):
            await channel.wait_ready(GENEROUS)
        assert channel.metrics_port is not None
        health = await get(channel.metrics_port, "/healthz")
        page = samples((await get(channel.metrics_port, "/metrics")).text)
    assert health.status_code == 503
    bad = {"account": "default", "folder": "NoSuchFolder", "state": "failed",
           "code": "folder_missing"}  # fmt: skip
    assert health.json()["unhealthy"] == [bad]
    assert value(page, "prx_email_mailbox_up", account="default", folder="NoSuchFolder") == 0


async def test_off_by_default_and_a_taken_port_fails_the_start_with_a_code(
    table: dict[str, Any],
) -> None:
    port = table.pop("metrics_port")
    async with EmailChannel(config_from_table(table)) as plain:
        assert plain.metrics_port is None
    # While one channel serves its endpoint, another cannot take the same port.
    async with EmailChannel(config_from_table({**table, "metrics_port": port})) as first:
        assert first.metrics_port == port
        other = {**table, "metrics_port": port, "state_dir": table["state_dir"] + "-2"}
        second = EmailChannel(config_from_table(other))
        with pytest.raises(ChannelError) as info:
            await second.start()
        assert info.value.code == "metrics_bind_failed"
        assert str(port) in str(info.value)
        await second.close()


@pytest.fixture
async def served(table: dict[str, Any]) -> AsyncIterator[int]:
    async with EmailChannel(config_from_table(table)) as channel:
        assert channel.metrics_port is not None
        yield channel.metrics_port


async def test_the_server_answers_only_small_get_requests(
    served: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await get(served, "/nope")).status_code == 404
    async with httpx.AsyncClient(trust_env=False, timeout=GENEROUS) as client:
        post = await client.post(f"http://127.0.0.1:{served}/metrics", content=b"x")
        assert post.status_code == 405
        head = await client.head(f"http://127.0.0.1:{served}/status")
        assert head.status_code == 200 and head.content == b""
    head_too_big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (ops_http.MAX_HEAD_BYTES + 10)
    assert (await exchange(served, head_too_big)).startswith(b"HTTP/1.1 431 ")


async def test_a_client_that_never_finishes_its_request_is_cut_off(
    served: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops_http, "READ_TIMEOUT_SECS", 0.2)
    answer = await exchange(served, b"GET /metrics HTTP/1.1\r\n")  # and then nothing
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_connections_beyond_the_limit_are_turned_away(
    served: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops_http, "MAX_CONNECTIONS", 2)
    idle = [await asyncio.open_connection("127.0.0.1", served) for _ in range(2)]
    # Each idle one is inside the server (reading its head) before the next comes.
    answer = await exchange(served, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ")
    for _, w in idle:
        w.close()
    # The held ones going away frees the endpoint again (once the server saw them go).
    async with asyncio.timeout(GENEROUS):
        while (await get(served, "/status")).status_code != 200:
            pass


def test_prx_email_run_serves_the_endpoint_and_status_prints_the_mailboxes(
    table: dict[str, Any], tmp_path: Path
) -> None:
    bot = tmp_path / "bot.py"
    bot.write_text("async def handle(msg):\n    return None\n")
    config = write_config(tmp_path / "config.toml", table)
    with reaped(start_run(bot, config)):
        cmd = [sys.executable, "-m", "prx_channel_email.cli", "status", "-c", str(config)]
        shown = ""
        for _ in range(60):  # until the mailbox is connected (each try is a new process)
            done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                                  timeout=GENEROUS, check=False)  # fmt: skip
            shown = done.stdout + done.stderr
            if done.returncode == 0:
                break
            assert done.returncode == 1, shown  # reachable, just not connected yet
        assert done.returncode == 0, shown
        assert "default" in shown and "INBOX" in shown and "connected" in shown
        raw = subprocess.run([*cmd, "--json"], capture_output=True, text=True,
                             env=subprocess_env(), timeout=GENEROUS, check=True)  # fmt: skip
        assert json.loads(raw.stdout)[0]["state"] == "connected"
        page = httpx.get(f"http://127.0.0.1:{table['metrics_port']}/metrics", trust_env=False)
        assert 'prx_email_mailbox_up{account="default",folder="INBOX"} 1.0' in page.text
    # Nothing runs there any more: a clear error and exit 3, no traceback.
    gone = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                          timeout=GENEROUS, check=False)  # fmt: skip
    assert gone.returncode == 3
    assert "nothing answers" in gone.stderr and "Traceback" not in gone.stderr


def test_counters_of_several_mailboxes_are_labelled_per_folder_or_summed_per_account() -> None:
    boxes = [MailboxStatus(account="support", folder=f, state=ChannelState.CONNECTED)
             for f in ("INBOX", "Escalations")]  # fmt: skip
    sets = [
        CounterSet("support", "INBOX", {"inbound.handed_on": 3, "inbound.skipped.not_allowed": 1,
                                        "outbound.sent": 2, "some.new_counter": 5}),
        CounterSet("support", "Escalations", {"inbound.handed_on": 4,
                                              "inbound.skipped.not_allowed": 2}),
    ]  # fmt: skip
    registry = make_registry(ChannelCollector(lambda: boxes, lambda: sets, lambda: {"support": 7}))
    page = samples(render(registry).decode())
    assert value(page, "prx_email_messages_delivered_total", account="support", folder="INBOX") == 3
    assert value(page, "prx_email_messages_delivered_total", account="support",
                 folder="Escalations") == 4  # fmt: skip
    assert value(page, "prx_email_messages_refused_total", account="support",
                 reason="not_allowed") == 3  # fmt: skip
    assert value(page, "prx_email_replies_sent_total", account="support") == 2
    assert value(page, "prx_email_outbox_pending", account="support") == 7
    # A counter without a metric of its own is still exported, under its name.
    assert value(page, "prx_email_events_total", account="support", event="some_new_counter") == 5
