"""Benchmark: the mailbox tools' search over a big mailbox, against a real Dovecot.

Fills one mailbox (default 10,000 messages: 80 % from allowed senders, 20 % from
strangers and lists that the tools must hide; 1 in 10 mentions an invoice), then
measures, in one run:

* latency of the first page (session opened cold, then warm) and of the next page,
  for a listing (no query) and for a query ("invoice", a server-side TEXT search);
* bytes the server sent per page (the tools' session counts them), against a naive
  client that fetches every message to search it itself (the baseline: same server,
  same run);
* peak Python allocations (tracemalloc) of a page vs the naive fetch-all.

    python bench/bench_tools.py [--count 10000] [--limit 20]

Ratios, not absolute times, are what to compare between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import smtplib
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prx_channel_email._inbound.pipeline import InboundPipeline  # noqa: E402
from prx_channel_email._net.imap import open_session  # noqa: E402
from prx_channel_email._tools import MailboxTools, ToolAccount  # noqa: E402
from prx_channel_email.config import EmailConfig  # noqa: E402
from tests.servers.dovecot import Account, DovecotServer  # noqa: E402

T = TypeVar("T")
ALLOWED = [f"person{i}@example.org" for i in range(40)]
STRANGERS = [f"x{i}@elsewhere.example" for i in range(10)]
WORDS = ["the", "quarterly", "plan", "meeting", "notes", "budget", "review", "draft", "team"]


def message(i: int, rng: random.Random) -> bytes:
    """A plain-text mail of about 3 KB (built as text: the fill must not take minutes)."""
    hidden = i % 5 == 0
    sender = rng.choice(STRANGERS) if hidden else rng.choice(ALLOWED)
    subject = f"Message {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30)]
    if i % 10 == 3:
        lines.append("The invoice is attached.")
    head = [
        f"From: {sender}",
        "To: bot@example.test",
        f"Subject: {subject}",
        "Date: Mon, 05 Jan 2026 10:00:00 +0000",
        f"Message-ID: <bench-{i}@example.org>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    if hidden and i % 10 == 0:
        head.append("List-Id: <team.lists.example>")
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode()


def fill(server: DovecotServer, account: Account, count: int, connections: int = 3) -> None:
    """Deliver ``count`` messages over LMTP, on a few connections at once."""
    rng = random.Random(7)
    raws = [message(i, rng) for i in range(count)]

    def deliver(part: list[bytes]) -> None:
        with smtplib.LMTP(server.host, server.lmtp_port, local_hostname="localhost") as lmtp:
            for raw in part:
                lmtp.sendmail("sender@example.org", [account.address], raw)

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(deliver, [raws[i::connections] for i in range(connections)]))


def config_for(server: DovecotServer, account: Account, state: Path) -> EmailConfig:
    return EmailConfig(
        imap_host="127.0.0.1",
        imap_port=server.imaps_port,
        smtp_host="127.0.0.1",
        username=account.username,
        password=account.password,
        from_address=account.address,
        ca_file=server.ca_file,
        state_dir=state,
        allowed_senders=["@example.org"],
        sender_auth="off",  # the fill carries no Authentication-Results
        command_timeout_secs=120,
    )


async def timed(work: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    start = time.perf_counter()
    result = await work()
    return result, time.perf_counter() - start


async def peak(work: Callable[[], Awaitable[object]]) -> int:
    """Peak traced Python allocations (bytes) of one awaited piece of work (a separate
    run: tracing slows Python down, so latencies are measured without it)."""
    tracemalloc.start()
    try:
        await work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def naive_fetch_all(config: EmailConfig) -> tuple[int, int]:
    """What a client without server-side search does: download every message."""
    session = await open_session(config)
    try:
        info = await session.select("INBOX")
        uids = await session.uid_search("ALL")
        kept = 0
        for at in range(0, len(uids), 200):
            bodies = await session.fetch_bodies(uids[at : at + 200])
            kept += sum(1 for raw in bodies.values() if b"invoice" in raw.lower())
        assert info.exists == len(uids)
        return session.bytes_received, kept
    finally:
        await session.logout()


async def run(count: int, limit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="prx-bench-tools-") as tmp, DovecotServer() as server:
        account = server.add_user()
        started = time.perf_counter()
        fill(server, account, count)
        filled = time.perf_counter() - started
        config = config_for(server, account, Path(tmp))
        tools = MailboxTools([ToolAccount("default", config, InboundPipeline(config))])
        out: dict[str, Any] = {"messages": count, "limit": limit, "fill_secs": round(filled, 1)}
        try:
            for label, query in (("listing", None), ("query", "invoice")):

                def page(q: str | None = query, c: str | None = None) -> Awaitable[Any]:
                    return tools.search(q, limit=limit, cursor=c)

                await tools.close()  # the first page opens the session (cold)
                first, cold = await timed(page)
                before = tools.bytes_received()
                again, warm = await timed(page)
                warm_bytes = tools.bytes_received() - before
                cursor = again["next_cursor"]
                before = tools.bytes_received()
                nxt, later = await timed(lambda c=cursor: page(c=c))
                next_bytes = tools.bytes_received() - before
                assert len(first["messages"]) == limit and nxt["messages"]
                pages = [*first["messages"], *nxt["messages"]]
                assert len({m["id"] for m in pages}) == len(pages)  # no duplicates
                out[label] = {
                    "first_page_cold_ms": round(cold * 1000, 1),
                    "first_page_warm_ms": round(warm * 1000, 1),
                    "next_page_ms": round(later * 1000, 1),
                    "first_page_bytes": warm_bytes,
                    "next_page_bytes": next_bytes,
                    "peak_alloc_kb_first": round(await peak(page) / 1024),
                    "peak_alloc_kb_next": round(await peak(lambda c=cursor: page(c=c)) / 1024),
                }
        finally:
            await tools.close()
        (total, matches), naive_secs = await timed(lambda: naive_fetch_all(config))
        out["naive_fetch_all"] = {
            "secs": round(naive_secs, 2),
            "bytes": total,
            "peak_alloc_kb": round(await peak(lambda: naive_fetch_all(config)) / 1024),
            "invoice_matches": matches,
        }
        for label in ("listing", "query"):
            page = out[label]
            page["bytes_vs_naive"] = round(page["first_page_bytes"] / total, 5)
            page["next_page_time_vs_naive"] = round(page["next_page_ms"] / 1000 / naive_secs, 4)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.count, args.limit)), indent=2))


if __name__ == "__main__":
    main()
