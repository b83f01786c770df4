"""The README's nanobot route, as a user runs it: ``python -m
prx_channel_email.integrations.nanobot gateway`` with the channel table in
``~/.nanobot/config.json``. nanobot's whole gateway runs (its AgentLoop, sessions,
ChannelManager); only the model is a scripted echo on loopback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "nanobot", reason='the nanobot extra is not installed (pip install -e ".[test,nanobot]")'
)

from tests.fakes.chat_model import EchoChatModel
from tests.integration_helpers import host_process, host_table, lunch_conversation
from tests.operator_helpers import subprocess_env
from tests.servers.dovecot import Account, DovecotServer, free_ports
from tests.servers.smtp import SmtpServer


async def test_nanobot_gateway_answers_email_in_the_thread_and_keeps_the_session(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
    chat_model: EchoChatModel,
) -> None:
    home = tmp_path / "home"
    (home / ".nanobot").mkdir(parents=True)
    section = {"enabled": True, **host_table(tmp_path, smtp_server, dovecot, account)}
    config = {
        "providers": {"openai": {"apiKey": "sk-test", "apiBase": chat_model.base_url}},
        "agents": {"defaults": {"model": "openai/echo", "provider": "openai"}},
        "channels": {"prx_email": section, "websocket": {"enabled": False}},
    }
    (home / ".nanobot" / "config.json").write_text(json.dumps(config))
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "prx_channel_email.integrations.nanobot", "gateway",
               "--port", str(port)]  # fmt: skip
    env = {**subprocess_env(), "HOME": str(home)}
    log = tmp_path / "gateway.log"
    with host_process(command, env, log, signal.SIGTERM) as proc:
        await lunch_conversation(dovecot, account, smtp_server, timeout=90)
        # nanobot's agent loop sent the model the first mail along with the second:
        # both mails of the thread are one nanobot session.
        history = "\n".join(chat_model.user_texts(len(chat_model.requests) - 1))
        assert "Are you free today?" in history and "Noon works." in history
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    assert "Stopped prx_email channel" in output
