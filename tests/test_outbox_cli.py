"""``prx-email outbox list|retry``: what an operator sees of the outbox; retrying failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.cli import app
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import SendError
from prx_channel_email.models import SendMessage
from tests.outbound_helpers import ANN, smtp_config
from tests.servers.smtp import SmtpServer

runner = CliRunner()
GONE = "gone@people.example"


def write_toml(config: EmailConfig, path: Path) -> Path:
    table = {
        "imap_host": config.imap_host,
        "smtp_host": config.smtp_host,
        "smtp_port": config.smtp_port,
        "smtp_security": config.smtp_security,
        "username": config.username,
        "password": config.password.get_secret_value() if config.password else "",
        "from_address": config.from_address,
        "ca_file": str(config.ca_file),
        "state_dir": str(config.state_dir),
        "send_max_attempts": config.send_max_attempts,
    }
    lines = ["[channels_config.email]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


async def send_all(config: EmailConfig, *messages: SendMessage) -> None:
    """Send each through an outbox and wait until nothing is pending."""
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), retry_base_secs=0.02, lease_secs=0.5)
        await outbox.start()
        try:
            for m in messages:
                with contextlib.suppress(SendError):
                    await outbox.send(m)
            await asyncio.wait_for(outbox.wait_idle(), timeout=10)
        finally:
            await outbox.close()


@pytest.fixture
def failed_state(tmp_path: Path, smtp_server: SmtpServer) -> tuple[EmailConfig, Path]:
    """Three rows: one sent, one that gave up on a 451, one refused with 550."""
    config = smtp_config(tmp_path, smtp_server, send_max_attempts=1)
    smtp_server.reject_recipient(GONE, "550 5.1.1 mailbox unavailable")
    asyncio.run(
        send_all(
            config,
            SendMessage(content="SECRET-BODY-sent", recipient=ANN),
            SendMessage(content="SECRET-BODY-gone", recipient=GONE),
        )
    )
    smtp_server.script_rcpt(["451 4.3.0 try later"])
    asyncio.run(send_all(config, SendMessage(content="SECRET-BODY-outage", recipient=ANN)))
    return config, write_toml(config, tmp_path / "config.toml")


def test_list_shows_rows_without_their_text(failed_state: tuple[EmailConfig, Path]) -> None:
    _config, path = failed_state
    result = runner.invoke(app, ["outbox", "list", "--config", str(path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "SECRET-BODY" not in result.output
    for expected in ("sent", "failed", GONE, "550", "mailbox unavailable", "gave up after 1"):
        assert expected in text, expected

    result = runner.invoke(app, ["outbox", "list", "--json", "--config", str(path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["id"], r["state"], r["recipient"]) for r in rows] == [
        (3, "failed", ANN),
        (2, "failed", GONE),
        (1, "sent", ANN),
    ]
    assert rows[0]["last_error"].startswith("gave up after 1 attempt(s)")
    assert rows[1]["smtp_code"] == 550 and rows[1]["attempts"] == 1
    assert "SECRET-BODY" not in result.output and "raw" not in rows[0]

    result = runner.invoke(app, ["outbox", "list", "--state", "sent", "--json", "-c", str(path)])
    assert [r["id"] for r in json.loads(result.output)] == [1]
    result = runner.invoke(app, ["outbox", "list", "--state", "bogus", "-c", str(path)])
    assert result.exit_code == 1 and "unknown state" in result.output


def test_retry_requeues_what_ran_out_then_an_explicit_id(
    failed_state: tuple[EmailConfig, Path], smtp_server: SmtpServer
) -> None:
    config, path = failed_state
    assert len(smtp_server.messages) == 1
    result = runner.invoke(app, ["outbox", "retry", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "requeued 1 reply" in result.output
    asyncio.run(send_all(config))  # the next run sends it
    _first, retried = smtp_server.messages
    assert b"SECRET-BODY-outage" in retried.raw

    # The permanent failure stays failed until the operator names it (after fixing the cause).
    result = runner.invoke(app, ["outbox", "retry", "--config", str(path)])
    assert "requeued 0 replies" in result.output
    smtp_server.reset()
    result = runner.invoke(app, ["outbox", "retry", "2", "7", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "requeued 1 reply" in result.output and "1 of the given ids" in result.output
    asyncio.run(send_all(config))
    [got] = smtp_server.messages
    assert got.rcpt_tos == (GONE,)
    result = runner.invoke(app, ["outbox", "list", "--json", "--config", str(path)])
    assert [r["state"] for r in json.loads(result.output)] == ["sent", "sent", "sent"]


def test_list_without_state_says_so(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server)
    path = write_toml(config, tmp_path / "config.toml")
    result = runner.invoke(app, ["outbox", "list", "--config", str(path)])
    assert result.exit_code == 1
    assert "no state" in result.output
    assert not config.state_dir.exists()
