"""send() on a full state disk: a SendError with a storage code, never a sqlite3 error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prx_channel_email.errors import SendError
from prx_channel_email.models import SendMessage
from tests.disk_helpers import fill, tmpfs
from tests.outbound_helpers import ANN, smtp_config
from tests.servers.smtp import SmtpServer
from tests.test_outbox import rows, running_outbox


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: small enough to fill in a moment."""
    where = tmp_path / "disk"
    where.mkdir()
    with tmpfs(where, size="2m"):
        yield where


async def test_send_on_a_full_disk_is_a_clear_refusal(
    small_disk: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(small_disk, smtp_server)
    async with running_outbox(config) as outbox:
        before = await outbox.send(SendMessage(content="before", recipient=ANN))
        filler = fill(small_disk)
        for i in range(3):  # the same answer each time: no sqlite3 error, nothing sent
            with pytest.raises(SendError) as info:
                await outbox.send(SendMessage(content=f"x{i}" * 5000, recipient=ANN))
            assert info.value.code == "storage_full", info.value
            assert str(config.state_dir) in str(info.value)
            assert "nothing was sent" in str(info.value)
        assert [m.message()["Message-ID"] for m in smtp_server.messages] == [before]
        assert outbox.healthy is False and outbox.storage_error == "storage_full"
        filler.unlink()  # space is back: the next send just works, no restart
        after = await outbox.send(SendMessage(content="after", recipient=ANN))
        assert outbox.healthy is True and outbox.storage_error is None
    assert [m.message()["Message-ID"] for m in smtp_server.messages] == [before, after]
    assert [r["state"] for r in rows(config)] == ["sent", "sent"]
