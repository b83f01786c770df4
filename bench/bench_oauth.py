"""Benchmark: token requests of an idle OAuth channel, and recovery after a new sign-in.

Runs the real channel against the test fixtures (Dovecot with an oauth2 passdb,
the XOAUTH2 SMTP server, the local authorization server) on a shortened clock:
an access token lives ``--hour`` seconds, which stands for one hour, and the
channel idles for ``--hours`` of those. Two idle cases:

* the IMAP session stays up (IDLE re-issued every "half hour");
* the server drops the session every "hour" (as some providers do), so the
  channel logs in again each time.

Then: the grant is revoked, the channel reports oauth_reauth_required, a new
device-flow sign-in is written, and the time until the listener is back is
measured (with the real 20 s poll interval).

    python bench/bench_oauth.py [--hour 4] [--hours 6]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email import EmailChannel  # noqa: E402
from prx_channel_email._oauth.flows import login_device  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402
from prx_channel_email.models import ChannelMessage  # noqa: E402
from tests.oauth_helpers import oauth_config  # noqa: E402
from tests.servers.certs import make_pki  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.oauth_server import OAuthServer  # noqa: E402
from tests.servers.smtp import SmtpServer  # noqa: E402


async def idle(
    config: EmailConfig,
    server: OAuthServer,
    hour: float,
    hours: int,
    drop: Callable[[], None] | None,
) -> int:
    """Token requests while the channel idles ``hours`` (calling ``drop`` every hour)."""
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        await asyncio.wait_for(channel.sync.synced.wait(), 30)
        before = server.total_token_requests()
        for _ in range(hours):
            await asyncio.sleep(hour)  # the idling itself is what is measured
            if drop is not None:
                drop()
        requests = server.total_token_requests() - before
        assert await channel.health_check()
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return requests


async def recovery(config: EmailConfig, server: OAuthServer, user: str) -> float:
    server.revoke_all(user)
    queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()
    async with EmailChannel(config) as channel:
        listener = asyncio.create_task(channel.listen(queue))
        while channel.sync.status.last_error_code != "oauth_reauth_required":
            await asyncio.sleep(0.05)
        channel.sync.synced.clear()

        def approve() -> None:
            server.approve(server.wait_device_request(20), user)

        thread = threading.Thread(target=approve)
        thread.start()
        await login_device(config, say=lambda _: None, within=60)
        signed_in = time.monotonic()
        thread.join()
        await asyncio.wait_for(channel.sync.synced.wait(), 120)
        elapsed = time.monotonic() - signed_in
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hour", type=float, default=4.0, help="seconds that stand for 1 h")
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--recoveries", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        server = OAuthServer().start()
        server.access_ttl = args.hour
        dovecot = DovecotServer(pki=pki, oauth_introspection_url=f"{server.url}/introspect")
        dovecot.start()
        smtp = SmtpServer(pki, oauth_validator=server.token_is_valid)
        smtp.start()
        try:
            account = dovecot.add_user()
            # IDLE re-issued every "half hour", keepalive well inside it.
            half = max(1, int(args.hour / 2))
            fields = {"idle_timeout_secs": half, "keepalive_secs": 1}
            cfg = oauth_config(root / "a", server, dovecot, smtp, account, **fields)
            stay = await idle(cfg, server, args.hour, args.hours, None)
            cfg = oauth_config(root / "b", server, dovecot, smtp, account, **fields)
            dropped = await idle(cfg, server, args.hour, args.hours, lambda: dovecot.kick(account))
            times = []
            for i in range(args.recoveries):
                cfg = oauth_config(root / f"r{i}", server, dovecot, smtp, account)
                times.append(await recovery(cfg, server, account.username))
        finally:
            smtp.stop()
            dovecot.close()
            server.stop()
    print(f"one 'hour' = {args.hour:g} s of token lifetime; idled {args.hours} 'hours'")
    print(f"token requests per hour, session stays up:       {stay / args.hours:.2f}")
    print(f"token requests per hour, session dropped hourly: {dropped / args.hours:.2f}")
    shown = ", ".join(f"{t:.1f}" for t in times)
    print(f"recovery after a new sign-in (s): {shown}; max {max(times):.1f}")


if __name__ == "__main__":
    asyncio.run(main())
