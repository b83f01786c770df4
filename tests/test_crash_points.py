"""A kill at every commit point of the inbound flow, before and after it, in both
hand-off modes: the crash window covered deterministically, not by random kills.

Each test runs a real channel against real Dovecot in a child process
(tests/fakes/crash_child.py) whose Storage dies (SIGKILL) exactly at one named
state write: ``handoff#2`` is the second hand-off transaction of the run,
``ack#1`` the first settle by the host's ack, ``release#1`` the first release of
deferred mail, and so on (:func:`tests.fakes.crash_child.point_of` names them).
Then a second child runs until nothing is left to do, and the test checks what a
user would notice against what the README promises for the mode:

* the cursor never passes a mail that is not recorded (checked right after the
  kill, on disk);
* no mail lost: every allowed mail reached the host, refused mail never did;
* nothing comes twice beyond the documented repeats: with ``handoff="ack"`` only
  mail the host did not ack comes again (all of it, ``redelivered=True``); with
  ``"queue"`` at most the one message put last;
* a clean stop afterwards leaves nothing in flight or waiting.

:func:`test_census` runs each scenario without a kill and checks that the writes it
makes are exactly the points below: a new commit point in the code (or one moved
to its own transaction) fails there until it is covered here.

The children are forked from a server that imported the package once
(multiprocessing ``forkserver`` with a preload), which keeps a run well under a
second of start-up.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email._storage import (
    REJECTED,
    Cursor,
    HandoffBatch,
    Mailbox,
    MailKey,
    Record,
    open_storage,
)
from prx_channel_email._storage.sqlite.store import DB_NAME
from prx_channel_email.config import EmailConfig
from tests.fakes import crash_child
from tests.fakes.pipeline import imap_config
from tests.servers.dovecot import Account, DovecotServer

ALICE, BOB, MALLORY = "alice@example.org", "bob@example.net", "mallory@example.com"
STRANGER = "stranger@elsewhere.test"

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["tests.fakes.crash_child"])


@dataclass(frozen=True)
class Mail:
    key: str  # the Message-ID's local part: <key@crash.test>
    sender: str
    reply_to: str | None = None  # "BOT": the bot's own address (quarantined: own_mail)

    @property
    def id(self) -> str:
        return f"<{self.key}@crash.test>"

    def raw(self, bot: str) -> bytes:
        reply_to = f"Reply-To: {bot}\r\n" if self.reply_to == "BOT" else ""
        return (
            f"From: {self.sender}\r\nTo: {bot}\r\n{reply_to}Subject: {self.key}\r\n"
            f"Date: Mon, 07 Dec 2026 06:00:00 +0000\r\nMessage-ID: {self.id}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\nhello {self.key}\r\n"
        ).encode()


@dataclass(frozen=True)
class Scenario:
    """Mail in the folder before the first run (UIDs 1, 2, ... in this order)."""

    mails: list[Mail]
    allowed: list[str]
    refused: set[str]  # Message-IDs the host must never get
    settings: dict[str, Any] = field(default_factory=dict)
    remove: str | None = None  # taken off the allow-list once its mail waits
    release: bool = False  # the operator releases quarantined mail once it is listed
    # The cursor on disk before the first run: "none" (a first start), "zero" (the
    # channel ran before; the mail came while it was down), "other-uidvalidity" (the
    # folder was recreated since), "-1" (written by 0.x against Courier: repaired),
    # "decided" (an earlier run refused the first mail: its row, the cursor past it).
    cursor: str = "zero"

    @property
    def decided(self) -> int:
        """UIDs decided before the first run (the cursor on disk is past them)."""
        return 1 if self.cursor == "decided" else 0

    @property
    def expected(self) -> set[str]:
        return {m.id for m in self.mails} - self.refused


A1 = Mail("a1", ALICE)
SCENARIOS = {
    # A backlog: accepted, refused and duplicate mail, two to a fetch step.
    "backlog": Scenario(
        mails=[A1, Mail("s1", STRANGER), A1, Mail("a2", ALICE), Mail("b1", BOB)],
        allowed=[ALICE, BOB],
        refused={Mail("s1", STRANGER).id},
        settings={"fetch_batch_size": 2},
    ),
    # Over the rate limit: a2 and m2 wait; a2 is released, m2 refused at release
    # (mallory is taken off the allow-list while it waits).
    "deferred": Scenario(
        mails=[A1, Mail("a2", ALICE), Mail("m1", MALLORY), Mail("m2", MALLORY)],
        allowed=[ALICE, MALLORY],
        refused={Mail("m2", MALLORY).id},
        settings={"rate_limit_count": 1, "rate_limit_window_secs": 1},
        remove=MALLORY,
    ),
    # The first start with initial_sync="unseen": mail handed on, then the baseline.
    "first-start": Scenario(
        mails=[Mail("u1", ALICE), Mail("u2", ALICE)],
        allowed=[ALICE],
        refused=set(),
        settings={"initial_sync": "unseen"},
        cursor="none",
    ),
    # UIDVALIDITY changed since the cursor was written: recent mail is looked at
    # again (handed on, the ledger drops what was), then the new baseline.
    "new-uidvalidity": Scenario(
        mails=[Mail("r1", ALICE), Mail("r2", ALICE)],
        allowed=[ALICE],
        refused=set(),
        cursor="other-uidvalidity",
    ),
    # A cursor of -1: repaired from the mail's arrival dates, then the hand-off.
    "repair": Scenario(
        mails=[Mail("p1", ALICE), Mail("p2", ALICE)],
        allowed=[ALICE],
        refused=set(),
        cursor="-1",
    ),
    # A refused mail of an earlier run, its row old enough to be pruned at start.
    "prune": Scenario(
        mails=[Mail("s0", STRANGER), Mail("a1", ALICE)],
        allowed=[ALICE],
        refused={Mail("s0", STRANGER).id},
        settings={"refused_retention_days": 0},
        cursor="decided",
    ),
    # Quarantined (it names the bot in Reply-To), then released by the operator.
    "quarantine": Scenario(
        mails=[Mail("q1", ALICE, reply_to="BOT"), Mail("a2", ALICE)],
        allowed=[ALICE, "@BOT"],  # the bot's domain: its Reply-To passes as a target
        refused=set(),
        release=True,
    ),
}

# Every commit point of each scenario, per mode, as a clean run makes them (the
# census checks this list against the writes). Tests kill before and after each.
# ``prune#1`` is the housekeeping at start (refused rows past their retention).
POINTS: dict[tuple[str, str], list[str]] = {
    ("backlog", "ack"): [
        "prune#1", "handoff#1", "handoff#2", "handoff#3", "ack#1", "ack#2", "ack#3",
    ],
    ("backlog", "queue"): ["prune#1", "handoff#1", "handoff#2", "handoff#3", "flush#1"],
    ("deferred", "ack"): [
        "prune#1", "defer#1", "ack#1", "ack#2", "refuse#1", "release#1", "ack#3",
    ],
    ("deferred", "queue"): [
        "prune#1", "handoff#1", "defer#1", "defer#2", "refuse#1", "release#1", "flush#1",
    ],
    ("first-start", "ack"): ["prune#1", "handoff#1", "ack#1", "ack#2", "cursor#1"],
    ("first-start", "queue"): ["prune#1", "handoff#1", "handoff#2", "flush#1", "cursor#1"],
    ("new-uidvalidity", "ack"): ["prune#1", "handoff#1", "ack#1", "ack#2", "cursor#1"],
    ("new-uidvalidity", "queue"): ["prune#1", "handoff#1", "handoff#2", "flush#1", "cursor#1"],
    ("repair", "ack"): ["prune#1", "cursor#1", "handoff#1", "ack#1", "ack#2"],
    ("repair", "queue"): ["prune#1", "cursor#1", "handoff#1", "handoff#2", "flush#1"],
    ("prune", "ack"): ["prune#1", "handoff#1", "ack#1"],
    ("prune", "queue"): ["prune#1", "handoff#1", "flush#1"],
    ("quarantine", "ack"): ["prune#1", "handoff#1", "ack#1", "unquarantine#1", "ack#2"],
    ("quarantine", "queue"): ["prune#1", "handoff#1", "flush#1", "unquarantine#1", "flush#2"],
}  # fmt: skip
# Points only counted (by the census), not killed at: the same transaction of the
# same code path is killed at in another scenario. An ack is one settle, whichever
# mail it settles (the ack of a released mail is killed at in "deferred"); after a
# cursor repair the hand-off is the backlog's; a prune with something to delete is
# killed at in "prune" (elsewhere it finds nothing old enough).
COVERED_ELSEWHERE = {
    ("backlog", "ack"): {"prune#1"},
    ("backlog", "queue"): {"prune#1"},
    ("deferred", "ack"): {"prune#1", "ack#1", "ack#2"},
    ("deferred", "queue"): {"prune#1"},
    ("first-start", "ack"): {"prune#1", "ack#1", "ack#2"},
    ("first-start", "queue"): {"prune#1"},
    ("new-uidvalidity", "ack"): {"prune#1", "ack#1", "ack#2"},
    ("new-uidvalidity", "queue"): {"prune#1"},
    ("repair", "ack"): {"prune#1", "ack#1", "ack#2"},
    ("repair", "queue"): {"prune#1", "handoff#2", "flush#1"},
    ("prune", "ack"): {"handoff#1", "ack#1"},
    ("prune", "queue"): {"handoff#1", "flush#1"},
    ("quarantine", "ack"): {"prune#1", "ack#1", "ack#2"},
    ("quarantine", "queue"): {"prune#1"},
}


def census_of(points: list[str]) -> Counter[str]:
    """How many writes of each kind ``points`` lists."""
    return Counter(p.split("#")[0] for p in points)


@dataclass
class Run:
    exitcode: int | None
    events: list[list[str]]
    log: str = ""  # the end of the child's log (why a run did not finish)

    def explain(self) -> str:
        return f"exit code {self.exitcode}; events {self.events}; log:\n{self.log}"

    def words(self, first: str) -> list[list[str]]:
        return [e[1:] for e in self.events if e[0] == first]

    @property
    def got(self) -> list[tuple[str, bool]]:
        return [(e[0], e[1] == "1") for e in self.words("GOT")]

    @property
    def ids(self) -> list[str]:
        return [mid for mid, _ in self.got]

    @property
    def acked(self) -> set[str]:
        return {e[0] for e in self.words("ACKED")}

    @property
    def acking(self) -> str | None:
        """The message whose ack() was under way when the run ended."""
        started = [e[0] for e in self.words("ACKING")]
        return started[-1] if started and started[-1] not in self.acked else None

    @property
    def writes(self) -> list[str]:
        return [e[0] for e in self.words("WRITE")]


async def run_child(
    config: EmailConfig,
    uidvalidity: int,
    scenario: Scenario,
    events: Path,
    *,
    kill: tuple[str, str] | None = None,
    seen: set[str] | frozenset[str] = frozenset(),
) -> Run:
    spec = {
        "config": {**json.loads(config.model_dump_json()), "password": config.imap_login[1]},
        "events": str(events),
        "log": str(events.with_suffix(".log")),
        "kill": list(kill) if kill else None,
        "expect": sorted(scenario.expected),
        "seen": sorted(seen),
        "remove": scenario.remove,
        "release": scenario.release,
        "top_uid": len(scenario.mails),
        "uidvalidity": uidvalidity,
    }
    proc = _CTX.Process(target=crash_child.main, args=(spec,), daemon=True)
    await asyncio.to_thread(proc.start)
    await asyncio.to_thread(proc.join, 45)
    if proc.exitcode is None:
        proc.kill()
        await asyncio.to_thread(proc.join)
        raise AssertionError(f"the child did not finish: {events.read_text()}")
    lines = events.read_text().splitlines() if events.exists() else []
    log = events.with_suffix(".log")
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    return Run(proc.exitcode, [line.split() for line in lines], tail)


async def prepare(
    dovecot: DovecotServer, account: Account, tmp_path: Path, scenario: Scenario, mode: str
) -> tuple[EmailConfig, int]:
    """The config, with the scenario's mail in the folder and its cursor on disk; and
    the folder's UIDVALIDITY."""
    config = imap_config(
        dovecot,
        account,
        tmp_path / "state",
        attachments_dir=tmp_path / "attachments",
        allowed_senders=[
            a.replace("@BOT", "@" + account.address.rpartition("@")[2]) for a in scenario.allowed
        ],
        handoff=mode,
        **scenario.settings,
    )
    for mail in scenario.mails:
        dovecot.deliver(account, mail.raw(account.address), mail_from=mail.sender)
    uidvalidity = dovecot.uidvalidity(account)
    cursor = {
        "zero": Cursor(uidvalidity, 0),
        "other-uidvalidity": Cursor(uidvalidity + 1, 7),
        "-1": Cursor(uidvalidity, -1),
        "decided": Cursor(uidvalidity, 1),
    }.get(scenario.cursor)
    if cursor is not None:
        mailbox = Mailbox(config.account, config.imap_folder)
        records = []
        if scenario.cursor == "decided":
            key = MailKey(config.account, config.imap_folder, uidvalidity, 1)
            records = [Record(key, scenario.mails[0].id, REJECTED, "not_allowed")]
        async with open_storage(config.state_dir) as store:
            await store.commit_handoff(HandoffBatch(mailbox, records=records, cursors=[cursor]))
    return config, uidvalidity


@dataclass
class DiskState:
    cursor: int | None  # its last UID, when it is of the folder's UIDVALIDITY
    recorded: dict[int, str]  # UID -> outcome ("in_flight" / "waiting" for those rows)

    @property
    def in_flight(self) -> set[int]:
        return {uid for uid, what in self.recorded.items() if what == "in_flight"}


def disk_state(config: EmailConfig, uidvalidity: int) -> DiskState:
    """What the state file says about the test's mailbox (read as the next start would)."""
    where = "account=? AND folder=?"
    args = (config.account, config.imap_folder)
    with sqlite3.connect(config.state_dir / DB_NAME) as conn:
        where += " AND uidvalidity=?"
        cursor = conn.execute(f"SELECT last_uid FROM cursor WHERE {where}", (*args, uidvalidity))
        row = cursor.fetchone()
        args += (uidvalidity,)
        recorded = {
            uid: outcome
            for uid, outcome in conn.execute(f"SELECT uid, outcome FROM ledger WHERE {where}", args)
        }
        for table, what in (("inflight", "in_flight"), ("deferred", "waiting")):
            for (uid,) in conn.execute(f"SELECT uid FROM {table} WHERE {where}", args):
                recorded[uid] = what
    return DiskState(row[0] if row else None, recorded)


def check_cursor(scenario: Scenario, state: DiskState) -> None:
    """The cursor never passes a mail that is not recorded (a true copy of a recorded
    mail needs no row of its own: it is skipped as a duplicate; a mail refused by an
    earlier run may have lost its row to the prune)."""
    uid_of = {m.id: uid for uid, m in reversed(list(enumerate(scenario.mails, 1)))}
    for uid in range(scenario.decided + 1, (state.cursor or 0) + 1):
        mail = scenario.mails[uid - 1]
        original = uid_of[mail.id]
        assert uid in state.recorded or (original < uid and original in state.recorded), (
            f"the cursor ({state.cursor}) passed UID {uid} ({mail.id}), which is not recorded:"
            f" {state.recorded}"
        )


def check_promises(
    scenario: Scenario,
    mode: str,
    killed: Run,
    after: Run,
    state: DiskState,
    settled: set[str] | frozenset[str] = frozenset(),
) -> None:
    """``settled``: mail handled for good on disk when the first run died."""
    expected, refused = scenario.expected, scenario.refused
    for run in (killed, after):
        assert len(run.ids) == len(set(run.ids)), f"a message came twice in one run: {run.ids}"
    got = set(killed.ids) | set(after.ids)
    assert expected <= got, f"lost: {sorted(expected - got)}"
    assert not got & refused, f"refused mail reached the host: {sorted(got & refused)}"
    again = [(mid, redelivered) for mid, redelivered in after.got if mid in killed.ids]
    assert all(redelivered for _, redelivered in again), f"a repeat not marked: {again}"
    repeats = {mid for mid, _ in again}
    assert not settled & set(after.ids), f"settled on disk, handed on again: {settled}"
    if mode == "ack":
        assert not repeats & killed.acked, f"acked, then handed on again: {repeats}"
        owed = set(killed.ids) - killed.acked - {killed.acking}
        assert owed <= repeats, f"got, never acked, not handed on again: {owed - repeats}"
    else:
        last = killed.ids[-1:] if killed.ids else []
        assert repeats <= set(last), f"queue mode repeated more than the last put: {repeats}"
    # A clean stop after the rest: nothing left in flight or waiting, all decided.
    assert state.cursor is not None and state.cursor >= len(scenario.mails)
    outcomes = {scenario.mails[uid - 1].id: what for uid, what in state.recorded.items()}
    assert {mid: outcomes.get(mid) for mid in expected} == dict.fromkeys(expected, "delivered")
    pruned = {m.id for m in scenario.mails[: scenario.decided]}
    for mid in refused:
        assert outcomes.get(mid) == "rejected" or (mid in pruned and mid not in outcomes)


CASES = [
    pytest.param(name, mode, point, when, id=f"{name}-{mode}-{point}-{when}")
    for (name, mode), points in POINTS.items()
    for point in points
    if point not in COVERED_ELSEWHERE.get((name, mode), set())
    for when in ("before", "after")
]


@pytest.mark.parametrize(("name", "mode", "point", "when"), CASES)
async def test_kill_at_commit_point(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    name: str,
    mode: str,
    point: str,
    when: str,
) -> None:
    scenario = SCENARIOS[name]
    config, uv = await prepare(dovecot, account, tmp_path, scenario, mode)
    killed = await run_child(config, uv, scenario, tmp_path / "killed.events", kill=(point, when))
    assert killed.exitcode != crash_child.NOT_REACHED, f"{point} never came: {killed.writes}"
    assert killed.words("KILL") == [[point, when]], killed.events
    assert killed.exitcode == -9
    at_kill = disk_state(config, uv)
    check_cursor(scenario, at_kill)
    settled = {scenario.mails[uid - 1].id for uid, what in at_kill.recorded.items()
               if what == "delivered"}  # fmt: skip
    after = await run_child(config, uv, scenario, tmp_path / "after.events", seen=set(killed.ids))
    assert after.exitcode == 0, after.explain()
    check_promises(scenario, mode, killed, after, disk_state(config, uv), settled)


@pytest.mark.parametrize(("name", "mode"), list(POINTS))
async def test_census(
    dovecot: DovecotServer, account: Account, tmp_path: Path, name: str, mode: str
) -> None:
    """A clean run makes exactly the writes the harness kills at (no more, no fewer)."""
    scenario = SCENARIOS[name]
    config, uv = await prepare(dovecot, account, tmp_path, scenario, mode)
    run = await run_child(config, uv, scenario, tmp_path / "census.events")
    assert run.exitcode == 0, run.explain()
    inbound = [w for w in run.writes if not w.startswith(("sender#", "request#"))]
    assert census_of(inbound) == census_of(POINTS[name, mode]), inbound
    state = disk_state(config, uv)
    check_promises(scenario, mode, Run(0, []), run, state)
    # The prune had something old to delete (the kills at it are not at a no-op).
    assert not set(range(1, scenario.decided + 1)) & set(state.recorded), state.recorded
