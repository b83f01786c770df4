"""Storage faults and privacy of the state dir.

A full or read-only state dir pauses the channel with a code (health false) and
never repeats mail; opening an unusable one is a ChannelError with the path and the
fix; the state is owner-only whatever the umask. The full-disk test mounts a small
tmpfs (root only: CI runs as root; elsewhere it is skipped, saying so).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prx_channel_email._storage import Cursor, Mailbox
from prx_channel_email._storage.sqlite.store import DB_NAME, StateStore
from prx_channel_email.channel import EmailChannel
from prx_channel_email.errors import ChannelError
from prx_channel_email.models import ChannelMessage
from tests.disk_helpers import ext4, fill, tmpfs
from tests.fakes.pipeline import imap_config
from tests.inbound_helpers import inbound_config
from tests.servers.dovecot import Account, DovecotServer

V1 = Path(__file__).resolve().parent / "data" / "state_v1.sqlite3"


def letter(n: int) -> tuple[str, bytes]:
    mid = f"<full-{n}@example.org>"
    raw = (
        f"From: carol@example.org\r\nTo: bot@example.test\r\nSubject: test {n}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {mid}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + "hello there\r\n" * 400
    )
    return mid, raw.encode()


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_full_state_disk_pauses_the_channel_and_never_repeats_mail(
    dovecot: DovecotServer, account: Account, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with tmpfs(state, size="2m"):
        config = imap_config(dovecot, account, state, attachments_dir=tmp_path / "att")
        channel = EmailChannel(config)
        channel.sync.writer.storage_backoff.base = 0.2  # retry the write soon after space returns
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        got: list[str] = []

        async def take(n: int) -> None:
            async def go() -> None:
                while len(got) < n:
                    got.append((await queue.get()).id)

            await asyncio.wait_for(go(), 20)

        async with channel:
            task = asyncio.create_task(channel.listen(queue))
            try:
                await asyncio.wait_for(channel.sync.synced.wait(), 15)
                for n in range(2):
                    dovecot.deliver(account, letter(n)[1])
                await take(2)
                filler = fill(state)
                caplog.set_level(logging.INFO, "prx_channel_email")
                paused = [letter(n) for n in range(2, 7)]
                for _, raw in paused:
                    dovecot.deliver(account, raw)
                await until(lambda: channel.status.storage_error == "storage_full")
                assert not await channel.health_check()
                assert channel.status.last_error_code == "storage_full"
                assert channel.state.code == "storage_full"  # what on_status reported
                assert queue.empty()  # paused in place: nothing handed on meanwhile
                filler.unlink()
                await take(7)
                await until(lambda: channel.status.storage_error is None)
                assert await channel.health_check()
                # One more message, then nothing else: no repeat came after the pause.
                dovecot.deliver(account, letter(7)[1])
                await take(8)
                channel.sync.synced.clear()
                await asyncio.wait_for(channel.sync.synced.wait(), 15)
                assert queue.empty()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert got == [letter(n)[0] for n in range(8)]  # every one once, in order
    pauses = [r for r in caplog.records if r.getMessage().startswith("storage.paused")]
    assert len(pauses) == 1, [r.getMessage() for r in pauses]  # said once...
    assert str(state) in pauses[0].getMessage()  # ...with the path


async def test_a_filesystem_turning_read_only_mid_run_is_storage_readonly(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """ext4 after an I/O error (``errors=remount-ro``): SQLite says "disk I/O error",
    the channel says what is wrong, ``storage_readonly``, not ``storage_error``."""
    state = tmp_path / "state"
    state.mkdir()
    with ext4(state, tmp_path / "state.img") as break_disk:
        config = imap_config(dovecot, account, state, attachments_dir=tmp_path / "att")
        channel = EmailChannel(config)
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        async with channel:
            task = asyncio.create_task(channel.listen(queue))
            try:
                await asyncio.wait_for(channel.sync.synced.wait(), 15)
                dovecot.deliver(account, letter(0)[1])
                assert (await asyncio.wait_for(queue.get(), 20)).id == letter(0)[0]
                break_disk()
                dovecot.deliver(account, letter(1)[1])
                await until(lambda: channel.status.storage_error is not None)
                assert channel.status.storage_error == "storage_readonly"
                assert channel.status.last_error_code == "storage_readonly"
                assert queue.empty()  # paused in place
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        with tmpfs(path, read_only=True):
            yield path
        return
    path.chmod(0o500)
    try:
        yield path
    finally:
        path.chmod(0o700)


@pytest.mark.parametrize("where", ["the dir", "a dir below it"])
async def test_a_read_only_state_dir_at_start_is_a_channel_error_with_the_fix(
    tmp_path: Path, where: str
) -> None:
    with read_only_dir(tmp_path / "ro") as ro:
        state_dir = ro if where == "the dir" else ro / "missing" / "state"
        config = inbound_config(tmp_path).model_copy(update={"state_dir": state_dir})
        channel = EmailChannel(config)
        with pytest.raises(ChannelError) as caught:
            await channel.start()
    assert caught.value.code == "storage_readonly"
    assert str(state_dir) in str(caught.value)
    assert "fix:" in str(caught.value) and "state_dir" in str(caught.value)
    assert not await channel.health_check()


def modes(directory: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(directory.stat().st_mode)}
    out.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()})
    return out


async def test_the_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        async with StateStore(tmp_path / "state") as store:
            await store.set_cursor(Mailbox("acct", "INBOX"), Cursor(1, 2))
            seen = modes(tmp_path / "state")
    finally:
        os.umask(old)
    assert {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"} <= set(seen)
    assert seen == {".": 0o700, **{name: 0o600 for name in seen if name != "."}}


async def test_state_an_older_release_left_readable_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    shutil.copy(V1, state / DB_NAME)
    (state / DB_NAME).chmod(0o644)
    async with StateStore(state) as store:
        assert (
            await store.get_cursor(Mailbox("bot@example.test@127.0.0.1:993", "INBOX")) is not None
        )
        seen = modes(state)
    assert seen == {".": 0o700, **{name: 0o600 for name in seen if name != "."}}


async def test_a_deferral_whose_commit_fails_is_still_released_in_the_same_run(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """The COMMIT that keeps a mail waiting fails (a full disk). The release line must
    not believe the row exists: once space returns, the write lands and the mail is
    handed on in this run (before: memory was changed inside the transaction, the
    release found no row when its turn came and dropped it until the next restart)."""
    state = tmp_path / "state"
    state.mkdir()
    window = 2
    with tmpfs(state, size="2m"):
        config = imap_config(
            dovecot, account, state, attachments_dir=tmp_path / "att",
            rate_limit_count=1, rate_limit_window_secs=window, handoff="ack",
        )  # fmt: skip
        channel = EmailChannel(config)
        channel.sync.writer.storage_backoff.base = 0.2  # retry the write soon after space returns
        queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
        async with channel:
            task = asyncio.create_task(channel.listen(queue))
            try:
                await asyncio.wait_for(channel.sync.synced.wait(), 15)
                dovecot.deliver(account, letter(0)[1])
                first = await asyncio.wait_for(queue.get(), 20)
                due = time.time() + window  # the next one may go by then
                # handoff="ack": nothing more is written for it until an ack, so the
                # next write is the deferral's.
                filler = fill(state)
                dovecot.deliver(account, letter(1)[1])  # over the limit: to be deferred
                await until(
                    lambda: (
                        channel.stats().get("inbound.deferred") == 1
                        and channel.status.storage_error == "storage_full"
                    )
                )
                # Its release is due while the disk is still full: nothing may be lost.
                await until(lambda: time.time() > due + 1.0)
                assert queue.empty()
                filler.unlink()
                second = await asyncio.wait_for(queue.get(), 20)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert [first.id, second.id] == [letter(0)[0], letter(1)[0]]
    assert channel.stats()["inbound.released"] == 1
