"""The doctor's checks of shared state, against a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from prx_channel_email._storage import open_storage
from prx_channel_email._storage.postgres.leases import LeaseTable
from prx_channel_email.config import EmailConfig
from prx_channel_email.doctor.database import database_checks
from prx_channel_email.doctor.report import Check
from tests.config_builder import build_config
from tests.servers.postgres import PASSWORD, PostgresServer


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _config(tmp_path: Path, **kw: Any) -> EmailConfig:
    login = {"username": "bot@example.test", "password": "x", "from_address": "bot@example.test"}
    return build_config(tmp_path, **login, **kw)


async def test_a_reachable_current_database_passes_and_names_who_serves(
    pg_url: str, tmp_path: Path
) -> None:
    store = await open_storage(tmp_path, url=pg_url).open()
    try:
        await LeaseTable(store.pool, lease_secs=30).acquire(  # type: ignore[attr-defined]
            "replica-7", [("support", "INBOX"), ("support", "Sales")], limit=2
        )
    finally:
        await store.close()
    checks = _by_name(await database_checks(_config(tmp_path, state_url=pg_url), 10))
    assert checks["database"].status == "pass"
    assert checks["database schema"].status == "pass"
    assert checks["clock skew"].status == "pass"
    assert checks["leases"].detail.startswith("2 mailbox(es) served by 1 replica(s): replica-7")
    assert all(PASSWORD not in c.detail for c in checks.values())


async def test_a_wrong_password_fails_the_database_check_without_showing_it(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.url(postgres.new_database()).replace(PASSWORD, "wrong-" + PASSWORD)
    (check,) = await database_checks(_config(tmp_path, state_url=url), 10)
    assert check.name == "database" and check.status == "fail"
    assert "password" in check.detail and PASSWORD not in check.detail
    assert "state_url" in (check.fix or "")


async def test_sqlite_state_has_no_database_checks(tmp_path: Path) -> None:
    assert await database_checks(_config(tmp_path), 10) == []
