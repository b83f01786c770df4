"""The examples run against the demo sandbox, as their docstrings tell users to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.operator_helpers import ROOT, subprocess_env


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --verbose: when a run fails, its log says which step stalled.
        [sys.executable, str(ROOT / "examples" / script), "--sandbox", "--once", "--verbose"],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=tmp_path,
    )


def test_echo_bot_answers_in_the_thread(tmp_path: Path) -> None:
    result = _run("echo_bot.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Subject: Re: Ping" in result.stdout
    assert "Is anybody there?" in result.stdout
    assert "In-Reply-To: <" in result.stdout


def test_agent_host_remembers_the_conversation(tmp_path: Path) -> None:
    result = _run("agent_host.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the agent remembered the thread" in result.stdout
    # Both turns were keyed by the same thread_ts.
    keys = {line.split("]")[0] for line in result.stdout.splitlines() if line.startswith("[<")}
    assert len(keys) == 1


async def test_echo_bot_handle_works_as_a_cli_handler() -> None:
    from prx_channel_email import ChannelMessage
    from prx_channel_email.cli import load_handler

    handle = load_handler(f"{ROOT / 'examples' / 'echo_bot.py'}:handle")
    msg = ChannelMessage(
        id="<m1@example.test>",
        sender="alice@example.test",
        sender_display="Alice",
        reply_target="alice@example.test",
        subject="Hi",
        content="How are you?",
        timestamp=0,
        thread_ts="<m1@example.test>",
    )
    answer = await handle(msg)
    assert answer is not None and "Hello Alice" in answer and "How are you?" in answer


def test_nanobot_echo_answers_in_the_thread(tmp_path: Path) -> None:
    pytest.importorskip("nanobot", reason="the nanobot extra is not installed")
    result = _run("nanobot_echo.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Subject: Re: Ping" in result.stdout
    assert "[prx_email:<" in result.stdout  # one nanobot session per email thread
    assert "In-Reply-To: <" in result.stdout


def test_hermes_echo_answers_in_the_thread(tmp_path: Path) -> None:
    pytest.importorskip("hermes_cli", reason="the hermes extra is not installed")
    result = _run("hermes_echo.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Subject: Re: Ping" in result.stdout
    assert "Echo: Subject: Ping" in result.stdout
    assert "In-Reply-To: <" in result.stdout
