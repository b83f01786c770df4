"""Three `prx-email run` replicas over twelve mailboxes on one PostgreSQL, with steady
mail, a SIGKILL and restart, and a SIGSTOP past the lease then SIGCONT.

What must hold, as a user of the bot sees it: every mail is answered exactly once (one
reply per mail at the SMTP server, whatever replica died or froze holding it), nothing
is lost, the mailboxes of a dead or frozen replica are served again within the bound,
and at the end the replicas share the mailboxes evenly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from tests.config_builder import config_table
from tests.operator_helpers import subprocess_env
from tests.servers.dovecot import Account, DovecotServer, free_ports
from tests.servers.smtp import SmtpServer

LEASE = 3.0
FOLDERS = ["INBOX", "Sales", "Escalations"]
# The contract's failover bound, plus room for a loaded test machine.
BOUND = LEASE + 15 + 30


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _write_config(path: Path, top: dict[str, Any], accounts: dict[str, dict[str, Any]]) -> None:
    lines = ["[channels_config.email]"]
    lines += [f"{k} = {_toml(v)}" for k, v in top.items() if v is not None]
    for name, table in accounts.items():
        lines.append(f"[channels_config.email.accounts.{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def twelve_mailboxes(
    where: Path, dovecot: DovecotServer, smtp: SmtpServer, state_url: str, lease: float
) -> tuple[list[Account], Path]:
    """Four Dovecot users with three folders each, as accounts box0..box3 of one config
    file on shared state; returns the users and the config's path."""
    users: list[Account] = [dovecot.add_user() for _ in range(4)]
    for u in users:
        for folder in FOLDERS[1:]:
            dovecot.create_folder(u, folder)
    top = config_table(where / "state", dovecot=dovecot, account=users[0], smtp=smtp,
                       allowed_senders=["@example.test"], handoff="ack", initial_sync="unseen",
                       state_url=state_url, lease_secs=lease)  # fmt: skip
    for key in ("username", "password"):
        top.pop(key)
    accounts = {f"box{i}": {"username": u.username, "password": u.password,
                            "from_address": u.address, "imap_folders": FOLDERS}
                for i, u in enumerate(users)}  # fmt: skip
    config = where / "config.toml"
    _write_config(config, top, accounts)
    return users, config


class Replica:
    def __init__(self, name: str, config: Path, log_dir: Path) -> None:
        self.name = name
        self.config = config
        (self.port,) = free_ports(1)
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = subprocess_env()
        env.update(PRX_EMAIL_REPLICA_ID=self.name, PRX_EMAIL_METRICS_PORT=str(self.port))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prx_channel_email.cli", "run", "echo",
                 "-c", str(self.config)],
                stdout=out, stderr=out, env=env, cwd=self.config.parent,
            )  # fmt: skip

    def status(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=2) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, list) else body.get("mailboxes")

    def serving(self) -> set[tuple[str, str]]:
        boxes = self.status() or []
        return {(b["account"], b["folder"]) for b in boxes
                if b.get("here") and b.get("state") == "connected"}  # fmt: skip

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _until(check: Any, within: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not within {within:g} s")
        time.sleep(0.1)
    return time.monotonic() - start


def test_three_replicas_answer_every_mail_once_through_kill_and_freeze(
    dovecot: DovecotServer, smtp_server: SmtpServer, tmp_path: Path, pg_url: str
) -> None:
    users, config = twelve_mailboxes(tmp_path, dovecot, smtp_server, pg_url, LEASE)
    every = {(f"box{i}", f) for i in range(len(users)) for f in FOLDERS}
    replicas = [Replica(f"r{i}", config, tmp_path) for i in range(3)]
    sent: dict[str, str] = {}  # Message-ID -> subject

    def mail_wave(tag: str) -> None:
        for i, u in enumerate(users):
            for folder in FOLDERS:
                mid = make_msgid(domain="example.test")
                subject = f"{tag} to box{i}/{folder}"
                raw = (f"From: alice@example.test\r\nTo: {u.address}\r\nSubject: {subject}\r\n"
                       f"Message-ID: {mid}\r\n\r\nhello\r\n").encode()  # fmt: skip
                dovecot.deliver(u, raw, folder=folder)
                sent[mid] = subject

    def answers() -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in smtp_server.messages:
            parent = (m.message().get("In-Reply-To") or "").strip()
            if parent in sent:
                counts[parent] = counts.get(parent, 0) + 1
        return counts

    try:
        for r in replicas:
            r.start()
        # Balance once stable: every mailbox by exactly one replica, none over its share.
        share = math.ceil(len(every) / 3) + 1

        def balanced() -> bool:
            served = [r.serving() for r in replicas]
            flat = [m for s in served for m in s]
            return sorted(flat) == sorted(every) and all(0 < len(s) <= share for s in served)

        _until(balanced, 90, "three replicas share the twelve mailboxes")
        mail_wave("w1")
        _until(lambda: len(answers()) == len(sent), 90, "wave 1 answered")

        # A replica dies holding mailboxes; mail keeps coming.
        victim = replicas[0]
        held = victim.serving()
        assert held, "each of three replicas should serve some of twelve mailboxes"
        victim.signal(signal.SIGKILL)
        victim.proc.wait(10)  # type: ignore[union-attr]
        mail_wave("w2")
        took = _until(lambda: held <= replicas[1].serving() | replicas[2].serving(), BOUND,
                      "a killed replica's mailboxes served by the others")  # fmt: skip
        assert took <= BOUND
        _until(lambda: len(answers()) == len(sent), 90, "wave 2 answered")
        victim.start()  # it comes back and gets its share again

        # A replica freezes past its lease with mail under way, then wakes up.
        frozen = replicas[1]
        _until(lambda: len(frozen.serving()) > 0, 60, "the replica to freeze serves something")
        frozen_held = frozen.serving()
        frozen.signal(signal.SIGSTOP)
        mail_wave("w3")
        others = [replicas[0], replicas[2]]
        _until(lambda: frozen_held <= others[0].serving() | others[1].serving(), BOUND,
               "a frozen replica's mailboxes served by the others")  # fmt: skip
        frozen.signal(signal.SIGCONT)
        mail_wave("w4")
        _until(lambda: len(answers()) == len(sent), 120, "every mail answered")

        _until(balanced, 4 * LEASE + 30, "the replicas share the mailboxes evenly again")
        # Exactly once: one reply per mail, not more, after everything settled.
        time.sleep(LEASE)  # a late duplicate from the woken replica would show here
        counts = answers()
        twice = {sent[mid]: n for mid, n in counts.items() if n != 1}
        assert not twice, f"answered more than once: {twice}"
        assert set(counts) == set(sent), "a mail was never answered"
        # Handed on (for the first time) by one replica only: another may hand a mail on
        # again only as a redelivery, after its first holder died or froze.
        first: dict[str, set[str]] = {}
        for r in replicas:
            for line in r.log.read_text(errors="replace").splitlines():
                if "inbound.handed_on " in line:
                    mid = line.rsplit("message_id=", 1)[-1].split()[0]
                    first.setdefault(mid, set()).add(r.name)
        doubled = {sent[m]: who for m, who in first.items() if m in sent and len(who) > 1}
        assert not doubled, f"handed on by two replicas: {doubled}"
        assert set(sent) <= set(first)
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.signal(signal.SIGCONT)
            r.stop()
