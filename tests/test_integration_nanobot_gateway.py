"""The README's nanobot route, as a user runs it: ``python -m
prx_channel_email.integrations.nanobot gateway`` with the channel table in
``~/.nanobot/config.json``. nanobot's whole gateway runs (its AgentLoop, sessions,
ChannelManager); only the model is a scripted echo on loopback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "nanobot", reason='the nanobot extra is not installed (pip install -e ".[test,nanobot]")'
)

from prx_channel_email.message_ids import parse_id_list
from tests.fakes.chat_model import EchoChatModel
from tests.integration_helpers import host_table, mail
from tests.operator_helpers import subprocess_env
from tests.outbound_helpers import ANN, parse
from tests.servers.dovecot import Account, DovecotServer, free_ports
from tests.servers.smtp import SmtpServer


@pytest.fixture
def chat_model() -> Iterator[EchoChatModel]:
    model = EchoChatModel().start()
    try:
        yield model
    finally:
        model.stop()


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
    log = tmp_path / "gateway.log"
    (port,) = free_ports(1)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prx_channel_email.integrations.nanobot", "gateway",
             "--port", str(port)],
            env={**subprocess_env(), "HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        dovecot.deliver(account, mail("<g1@people.example>", "Lunch", "Are you free today?"),
                        mail_from=ANN)  # fmt: skip
        (sent1,) = await smtp_server.await_messages(1, timeout=90)
        reply1 = parse(sent1.raw)
        assert reply1["In-Reply-To"] == "<g1@people.example>"
        assert reply1["Subject"] == "Re: Lunch"
        body1 = reply1.get_body(("plain",)).get_content()
        assert body1.startswith("echo:") and "Are you free today?" in body1

        refs = ["<g1@people.example>", reply1["Message-ID"]]
        dovecot.deliver(account, mail("<g2@people.example>", "Re: Lunch", "Noon works.",
                                      refs=refs), mail_from=ANN)  # fmt: skip
        (_, sent2) = await smtp_server.await_messages(2, timeout=90)
        reply2 = parse(sent2.raw)
        assert parse_id_list(reply2["References"]) == [*refs, "<g2@people.example>"]
        body2 = reply2.get_body(("plain",)).get_content()
        assert body2.startswith("echo:") and "Noon works." in body2
        # nanobot's agent loop sent the model the first mail along with the second:
        # both mails of the thread are one nanobot session.
        history = "\n".join(chat_model.user_texts(len(chat_model.requests) - 1))
        assert "Are you free today?" in history and "Noon works." in history
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "Stopped prx_email channel" in output
