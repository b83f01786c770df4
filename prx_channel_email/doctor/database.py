"""The doctor's checks of shared state (``state_url = "postgresql://..."``).

What an operator of replicas needs to know before starting them: the database answers
with this URL and password, its schema is current (a replica of an older release would
not understand a newer one), this machine's clock agrees with the database's (leases
run on the database's clock, but the local safety margin runs on ours), and who serves
which mailbox right now.
"""

from __future__ import annotations

import asyncio
import time

from prx_channel_email._storage import open_storage
from prx_channel_email._storage.postgres.leases import LeaseTable
from prx_channel_email._storage.postgres.schema import MIGRATIONS, mask_url
from prx_channel_email._storage.postgres.store import PostgresStore
from prx_channel_email.config import EmailConfig
from prx_channel_email.doctor.report import Check, Status
from prx_channel_email.errors import ChannelError

#: Beyond this many seconds between our clock and the database's, the doctor warns;
#: beyond a third of the lease it fails (the local margin would be eaten up).
SKEW_WARN_SECS = 2.0


async def database_checks(config: EmailConfig, budget: float) -> list[Check]:
    """The checks of the shared state; none when the state is SQLite in ``state_dir``."""
    if config.state_url is None:
        return []
    url = config.state_url.get_secret_value()
    where = mask_url(url)
    store = open_storage(config.state_dir, url=url)
    assert isinstance(store, PostgresStore)
    try:
        await asyncio.wait_for(store.open(), budget * 2)
    except (ChannelError, TimeoutError) as exc:
        detail = exc.message if isinstance(exc, ChannelError) else f"no answer within {budget} s"
        return [
            Check(
                "database",
                "fail",
                f"{where}: {detail}",
                "check that PostgreSQL runs and is reachable from here, and the user, password"
                " and database name in state_url (PRX_EMAIL_STATE_URL)",
            )
        ]
    checks = [Check("database", "pass", f"{where} answers")]
    try:
        applied = await store.migrations()
        wanted = [name for name, _ in MIGRATIONS]
        unknown = [n for n in applied if n not in wanted]
        if unknown:
            checks.append(Check(
                "database schema", "fail",
                f"the database has steps this release does not know: {', '.join(unknown)}",
                "a newer release wrote it: run that release (or newer) on every replica",
            ))  # fmt: skip
        else:
            checks.append(Check("database schema", "pass", f"current ({len(applied)} steps)"))
        before = time.time()
        theirs = await store.database_now()
        ours = (before + time.time()) / 2
        skew = abs(theirs - ours)
        limit = config.lease_secs / 3
        status: Status = "pass" if skew <= SKEW_WARN_SECS else ("warn" if skew <= limit else "fail")
        checks.append(Check(
            "clock skew", status, f"{skew:.2f} s between this machine and the database",
            None if status == "pass" else "run NTP (chrony, systemd-timesyncd) on this machine"
            " and the database's",
        ))  # fmt: skip
        holders = await LeaseTable(store.pool, lease_secs=config.lease_secs).holders()
        live = {m: h for m, h in holders.items() if h.expires_in > 0}
        owners = sorted({h.owner for h in live.values()})
        checks.append(Check(
            "leases", "pass",
            f"{len(live)} mailbox(es) served by {len(owners)} replica(s)"
            + (f": {', '.join(owners)}" if owners else " (none running)"),
        ))  # fmt: skip
    except ChannelError as exc:
        checks.append(Check("database", "fail", exc.message, "see the message"))
    finally:
        await store.close()
    return checks
