"""The PostgreSQL schema, its named migrations, and the connection pool.

The migration names are SQLite's (``_storage/sqlite/schema.py``), so ``migrations()``
answers the same on both backends and a later step is added to both. A PostgreSQL
database never held the shapes of earlier releases, so ``base`` creates the current
shape and the steps that reshaped SQLite files are recorded without work here;
``leases`` (mailbox ownership for replicas) is PostgreSQL's own.

Why the pool is set up as it is: no server-side prepared statements
(``prepare_threshold=None``) and no session state, so that a transaction-pooling
PgBouncer in front of the database works; every wait is bounded.
"""

from __future__ import annotations

import re
from typing import Any

from prx_channel_email._storage.ddl import LEDGER_REFUSED_INDEX, RELEASE_REQUESTS, statements
from prx_channel_email._storage.postgres.leases import LEASES_DDL
from prx_channel_email.errors import StorageError

BASE = """
CREATE TABLE IF NOT EXISTS cursor (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    last_uid BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account, folder)
);
CREATE TABLE IF NOT EXISTS ledger (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at DOUBLE PRECISION NOT NULL,
    handed_at DOUBLE PRECISION,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS ledger_by_id ON ledger (account, message_id);
CREATE INDEX IF NOT EXISTS ledger_by_sender ON ledger (account, sender, received_at);
CREATE INDEX IF NOT EXISTS ledger_by_thread ON ledger (account, thread_ts, received_at);
CREATE TABLE IF NOT EXISTS inflight (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT,
    reply_target TEXT,
    subject TEXT,
    thread_ts TEXT,
    refs TEXT,
    received_at DOUBLE PRECISION NOT NULL,
    message TEXT NOT NULL,
    handed_at DOUBLE PRECISION NOT NULL,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS inflight_by_id ON inflight (account, message_id);
CREATE TABLE IF NOT EXISTS deferred (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    reason TEXT NOT NULL,
    arrived_at DOUBLE PRECISION NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE INDEX IF NOT EXISTS deferred_in_order ON deferred (account, folder, seq);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    mail_from TEXT NOT NULL,
    recipient TEXT NOT NULL,
    raw BYTEA NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION,
    last_error TEXT,
    smtp_code INTEGER,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT,
    error_code TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (account, state, next_attempt_at);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_idempotency ON outbox (account, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS runtime_senders (
    account TEXT NOT NULL,
    entry TEXT NOT NULL,
    allowed BOOLEAN NOT NULL,
    changed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account, entry)
);
CREATE TABLE IF NOT EXISTS oauth_tokens (
    account TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_lock (
    account TEXT PRIMARY KEY
);
"""

# (name, DDL or "" for a step whose work "base" already did here).
MIGRATIONS: list[tuple[str, str]] = [
    ("base", BASE),
    ("deferred_mail", ""),
    ("outbox_idempotency_key", ""),
    ("runtime_senders", ""),
    ("inbound_inflight", ""),
    ("mail_keys", ""),
    ("oauth_tokens", ""),
    ("leases", LEASES_DDL),
    ("ledger_refused", LEDGER_REFUSED_INDEX),
    ("quarantine_releases", RELEASE_REQUESTS),
]

_MIGRATION_LOCK = 0x70727865  # "prxe": one migrating process at a time


async def migrate(pool: Any) -> list[str]:
    """Apply the steps not yet applied, each in its own transaction; returns their names.

    A transaction-scoped advisory lock (released at COMMIT, so PgBouncer-safe) keeps
    two replicas starting together from applying a step twice.
    """
    applied: list[str] = []
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        # Two concurrent CREATE ... IF NOT EXISTS of one table can still collide.
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),"
            "  seq BIGINT GENERATED ALWAYS AS IDENTITY)"
        )
    for name, script in MIGRATIONS:
        async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await cur.execute("SELECT 1 FROM schema_migrations WHERE name=%s", (name,))
            if await cur.fetchone() is not None:
                continue
            for statement in statements(script):
                await cur.execute(statement)
            await cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied


_URL_SECRET = re.compile(r"(?i)^(postgres(?:ql)?://[^:/@]*:)([^@]*)(@)")


def mask_url(url: str) -> str:
    """The URL with its password replaced (for every message and log line)."""
    return _URL_SECRET.sub(r"\1***\3", url)


def storage_error(exc: BaseException, url: str) -> StorageError:
    """The StorageError for a database failure: never the password, always the fix."""
    text = str(exc).replace(url, mask_url(url))
    secret = _URL_SECRET.match(url)
    if secret and secret.group(2):
        text = text.replace(secret.group(2), "***")
    code = "storage_full" if "could not extend file" in text or "No space" in text else (
        "storage_readonly" if "read-only transaction" in text else "storage_unavailable"
    )  # fmt: skip
    return StorageError(
        f"the shared state at {mask_url(url)} failed: {type(exc).__name__}: {text.strip()}"
        "; fix: check that the database is up and reachable, and the URL and password",
        code=code,
        path=mask_url(url),
    )
