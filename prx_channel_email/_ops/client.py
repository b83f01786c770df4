"""Reading a running instance's ``/status`` (``prx-email status``)."""

from __future__ import annotations

import httpx
from pydantic import TypeAdapter, ValidationError

from prx_channel_email.errors import ChannelError
from prx_channel_email.status import MailboxStatus

_BOXES = TypeAdapter(list[MailboxStatus])


def status_url(base: str) -> str:
    """``http://host:port`` or a full ``.../status`` URL -> the status URL."""
    base = base.rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return base if base.endswith("/status") else f"{base}/status"


def fetch_status(url: str, timeout: float) -> list[MailboxStatus]:
    """The mailboxes the instance at ``url`` reports; ChannelError ``unreachable`` or
    ``bad_status`` when nothing (or something else) answers there."""
    try:
        # trust_env=False: an HTTP(S)_PROXY set for the internet must not catch loopback.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.get(url)
    except httpx.HTTPError as exc:
        raise ChannelError(
            f"nothing answers at {url} ({type(exc).__name__}: {exc}); is `prx-email run` "
            "running with metrics_port set?",
            code="unreachable",
        ) from None
    if response.status_code != 200:
        raise ChannelError(f"{url} answered HTTP {response.status_code}", code="bad_status")
    try:
        return _BOXES.validate_json(response.content)
    except ValidationError:
        raise ChannelError(
            f"{url} did not answer with a prx-email status", code="bad_status"
        ) from None
