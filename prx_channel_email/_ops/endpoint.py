"""The three views over one channel, and the HTTP server that serves them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prx_channel_email._ops.http import HttpServer, Response
from prx_channel_email._ops.prometheus import ChannelCollector, CounterSet, make_registry, render
from prx_channel_email.status import MailboxStatus

JSON = "application/json"


def status_body(boxes: list[MailboxStatus]) -> list[dict[str, Any]]:
    return [box.model_dump(mode="json") for box in boxes]


def healthz_body(boxes: list[MailboxStatus]) -> dict[str, Any]:
    """``healthy`` and the mailboxes that are not, with why."""
    bad = [
        {"account": b.account, "folder": b.folder, "state": b.state.value, "code": b.code}
        for b in boxes
        if not b.healthy
    ]
    return {"healthy": not bad, "mailboxes": len(boxes), "unhealthy": bad}


class OpsEndpoint:
    """The three views over one channel, and the server that serves them."""

    def __init__(
        self,
        mailboxes: Callable[[], list[MailboxStatus]],
        counters: Callable[[], list[CounterSet]],
        outbox_pending: Callable[[], Awaitable[Mapping[str, int]]],
    ) -> None:
        self._mailboxes = mailboxes
        self._outbox_pending = outbox_pending
        self._pending: Mapping[str, int] = {}
        self.registry = make_registry(ChannelCollector(mailboxes, counters, lambda: self._pending))
        self.server = HttpServer(
            {"/metrics": self.metrics, "/healthz": self.healthz, "/status": self.status}
        )

    async def start(self, host: str, port: int) -> None:
        await self.server.start(host, port)

    @property
    def port(self) -> int:
        return self.server.port

    async def close(self) -> None:
        await self.server.close()

    async def metrics(self) -> Response:
        self._pending = await self._outbox_pending()
        return Response(200, render(self.registry), "text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self) -> Response:
        body = healthz_body(self._mailboxes())
        return Response(200 if body["healthy"] else 503, _json(body), JSON)

    async def status(self) -> Response:
        return Response(200, _json(status_body(self._mailboxes())), JSON)


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()
