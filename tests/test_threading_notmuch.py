"""An independent threading implementation (notmuch) agrees that replies join the thread."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from prx_channel_email._outbound.outbox import Outbox
from prx_channel_email._storage.sqlite.store import StateStore
from prx_channel_email._support.observability import Metrics
from prx_channel_email.models import SendMessage
from tests.outbound_helpers import ANN, human_mail, parse, seed_ledger, smtp_config
from tests.servers.smtp import SmtpServer

pytestmark = pytest.mark.skipif(
    shutil.which("notmuch") is None, reason="notmuch is not installed (apt install notmuch)"
)


async def notmuch(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "notmuch",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_replies_form_one_thread_in_notmuch(tmp_path: Path, smtp_server: SmtpServer) -> None:
    maildir = tmp_path / "mail"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    delivered: list[bytes] = []

    def deliver(raw: bytes) -> None:
        delivered.append(raw)
        (maildir / "new" / f"{len(delivered)}.test:2,").write_bytes(raw)

    config = smtp_config(tmp_path, smtp_server)
    first = human_mail("<start@people.example>", "Trip to Oslo")
    deliver(first)
    deliver(human_mail("<noise@people.example>", "Unrelated topic"))
    async with StateStore(config.state_dir) as store:
        outbox = Outbox(config, store, Metrics(), retry_base_secs=0.02)
        await outbox.start()
        try:
            await seed_ledger(
                store,
                config,
                message_id="<noise@people.example>",
                sender=ANN,
                subject="Unrelated topic",
                received_at=1,
            )
            await seed_ledger(
                store,
                config,
                message_id="<start@people.example>",
                sender=ANN,
                subject="Trip to Oslo",
                received_at=2,
            )
            # 1: an explicit reply to the first mail.
            await outbox.send(
                SendMessage(content="Booked!", recipient=ANN, in_reply_to="<start@people.example>")
            )
            reply1 = smtp_server.messages[-1].raw
            deliver(reply1)
            r1 = parse(reply1)
            # Ann answers the bot's reply (her client threads on it).
            refs = ["<start@people.example>", r1["Message-ID"]]
            deliver(human_mail("<again@people.example>", "Re: Trip to Oslo", refs=refs))
            await seed_ledger(
                store,
                config,
                message_id="<again@people.example>",
                sender=ANN,
                subject="Re: Trip to Oslo",
                references=refs,
                received_at=3,
            )
            # 2: content + recipient only: threads onto her latest mail.
            await outbox.send(SendMessage(content="Window seat too.", recipient=ANN))
            deliver(smtp_server.messages[-1].raw)
        finally:
            await outbox.close()

    config_file = tmp_path / "notmuch-config"
    config_file.write_text(
        f"[database]\npath={maildir}\n[user]\nname=Bot\nprimary_email=bot@example.test\n"
        "[new]\ntags=inbox;\n[maildir]\nsynchronize_flags=false\n"
    )
    env = {**os.environ, "NOTMUCH_CONFIG": str(config_file), "HOME": str(tmp_path)}
    await notmuch(env, "new", "--quiet")
    threads = (await notmuch(env, "search", "--output=threads", "*")).split()
    assert len(threads) == 2  # the conversation, and the unrelated mail on its own
    conversation = (
        await notmuch(env, "search", "--output=threads", "id:start@people.example")
    ).split()
    assert len(conversation) == 1
    members = (
        await notmuch(
            env, "search", "--output=messages", f"thread:{conversation[0].removeprefix('thread:')}"
        )
    ).split()
    ours = {parse(raw)["Message-ID"].strip("<>") for raw in delivered} - {"noise@people.example"}
    assert {m.removeprefix("id:") for m in members} == ours
    assert len(ours) == 4
