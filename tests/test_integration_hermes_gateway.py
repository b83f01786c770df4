"""The README's hermes route, as a user runs it: ``hermes gateway run`` with the plugin
enabled and ``platforms.prx_email`` in ``$HERMES_HOME/config.yaml``. hermes' whole
gateway runs (plugin loader, GatewayRunner, its agent, sessions); only the model is a
scripted echo on loopback.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "hermes_cli", reason='the hermes extra is not installed (pip install -e ".[test,hermes]")'
)

import yaml

from prx_channel_email.message_ids import parse_id_list
from tests.fakes.chat_model import EchoChatModel
from tests.integration_helpers import host_table, mail
from tests.operator_helpers import subprocess_env
from tests.outbound_helpers import ANN, parse
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.smtp import SmtpServer


@pytest.fixture
def chat_model() -> Iterator[EchoChatModel]:
    model = EchoChatModel().start()
    try:
        yield model
    finally:
        model.stop()


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
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [hermes_command(), "gateway", "run"],
            env={**subprocess_env(), "HERMES_HOME": str(home), "HOME": str(tmp_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        dovecot.deliver(account, mail("<k1@people.example>", "Lunch", "Are you free today?"),
                        mail_from=ANN)  # fmt: skip
        (sent1,) = await smtp_server.await_messages(1, timeout=120)
        reply1 = parse(sent1.raw)
        assert reply1["In-Reply-To"] == "<k1@people.example>"
        assert reply1["Subject"] == "Re: Lunch"
        body1 = reply1.get_body(("plain",)).get_content()
        assert body1.startswith("echo:") and "Are you free today?" in body1

        refs = ["<k1@people.example>", reply1["Message-ID"]]
        dovecot.deliver(account, mail("<k2@people.example>", "Re: Lunch", "Noon works.",
                                      refs=refs), mail_from=ANN)  # fmt: skip
        (_, sent2) = await smtp_server.await_messages(2, timeout=120)
        reply2 = parse(sent2.raw)
        assert parse_id_list(reply2["References"]) == [*refs, "<k2@people.example>"]
        body2 = reply2.get_body(("plain",)).get_content()
        assert body2.startswith("echo:") and "Noon works." in body2
        # hermes sent the model the first mail along with the second: one session.
        turns = ["\n".join(chat_model.user_texts(i)) for i in range(len(chat_model.requests))]
        assert any("Are you free today?" in t and "Noon works." in t for t in turns)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: hermes' planned foreground stop
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    output = log.read_text(errors="replace")
    gateway_log = (home / "logs" / "gateway.log").read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "prx_email connected" in gateway_log
    assert "prx_email disconnected" in gateway_log
