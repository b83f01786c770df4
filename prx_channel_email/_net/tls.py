"""TLS contexts for IMAP, SMTP and the doctor: certificates are always verified."""

from __future__ import annotations

import functools
import ssl

from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import InsecureConnectionError


def ssl_context(config: EmailConfig) -> ssl.SSLContext:
    """The system trust store, plus ``ca_file`` for self-signed servers. Never unverified."""
    return _context(str(config.ca_file) if config.ca_file is not None else None)


@functools.lru_cache(maxsize=16)
def _context(ca_file: str | None) -> ssl.SSLContext:
    # Reading the system trust store takes tens of milliseconds: once per CA file,
    # not once per connection on the event loop. A context is safe to share.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_plaintext_allowed(config: EmailConfig, host: str) -> None:
    """Refuse a plaintext connection that would carry the password off this machine."""
    if not config.plaintext_allowed(host):
        raise InsecureConnectionError(
            f"refusing a plaintext connection to {host}: the password would travel unencrypted. "
            "Use TLS or STARTTLS, or set allow_insecure = true if you accept the risk."
        )
