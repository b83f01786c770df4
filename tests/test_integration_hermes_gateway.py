"""The README's hermes route, as a user runs it: ``hermes gateway run`` with the plugin
enabled and ``platforms.prx_email`` in ``$HERMES_HOME/config.yaml``. hermes' whole
gateway runs (plugin loader, GatewayRunner, its agent, sessions); only the model is a
scripted echo on loopback.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "hermes_cli", reason='the hermes extra is not installed (pip install -e ".[test,hermes]")'
)

import yaml

from tests.fakes.chat_model import EchoChatModel
from tests.integration_helpers import host_process, host_table, lunch_conversation
from tests.operator_helpers import subprocess_env
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer


def hermes_command() -> str:
    beside = Path(sys.executable).parent / "hermes"
    found = str(beside) if beside.exists() else shutil.which("hermes")
    assert found, "the hermes extra is installed but its `hermes` command is not on PATH"
    return found


async def test_hermes_gateway_answers_email_in_the_thread_and_keeps_the_session(
    tmp_path: Path,
    smtp_server: SmtpServer,
    dovecot: DovecotServer,
    account: Account,
    chat_model: EchoChatModel,
) -> None:
    home = tmp_path / "hermes"
    home.mkdir()
    extra = host_table(tmp_path, smtp_server, dovecot, account)
    config = {
        "model": {
            "provider": "custom",
            "default": "echo",
            "base_url": chat_model.base_url,
            "api_key": "sk-test",
            "context_length": 131072,  # known, so hermes does not look the model up online
        },
        "plugins": {"enabled": ["prx_email"]},
        "platforms": {"prx_email": {"enabled": True, "extra": extra}},
    }
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**subprocess_env(), "HERMES_HOME": str(home), "HOME": str(tmp_path)}
    log = tmp_path / "gateway.log"
    # SIGINT (Ctrl+C) is hermes' planned foreground stop.
    with host_process([hermes_command(), "gateway", "run"], env, log, signal.SIGINT) as proc:
        await lunch_conversation(dovecot, account, smtp_server, timeout=120)
        # hermes sent the model the first mail along with the second: one session.
        turns = ["\n".join(chat_model.user_texts(i)) for i in range(len(chat_model.requests))]
        assert any("Are you free today?" in t and "Noon works." in t for t in turns)
    gateway_log = (home / "logs" / "gateway.log").read_text(errors="replace")
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert "prx_email connected" in gateway_log
    assert "prx_email disconnected" in gateway_log
    assert len(smtp_server.messages) == 2  # hermes' "set a home channel" prompt was not mailed
