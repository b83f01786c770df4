"""TLS contexts for IMAP, SMTP and the doctor: certificates are always verified."""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
from asyncio import sslproto
from dataclasses import dataclass
from pathlib import Path

from prx_channel_email._support.hosts import plaintext_allowed
from prx_channel_email.config.slices import ConfigSlice
from prx_channel_email.errors import InsecureConnectionError


@dataclass(frozen=True)
class TlsSettings(ConfigSlice):
    """What the TLS code reads of the config: whom to trust besides the system store,
    and whether plaintext may carry the password off this machine."""

    ca_file: Path | None = None
    allow_insecure: bool = False

    def plaintext_allowed(self, host: str) -> bool:
        return plaintext_allowed(host, self.allow_insecure)


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The system trust store, plus ``ca_file`` for self-signed servers. Never unverified."""
    return _context(str(tls.ca_file) if tls.ca_file is not None else None)


@functools.lru_cache(maxsize=16)
def _context(ca_file: str | None) -> ssl.SSLContext:
    # Reading the system trust store takes tens of milliseconds: once per CA file,
    # not once per connection on the event loop. A context is safe to share.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# asyncio reads every TLS connection through a buffer of its own of 256 KiB
# (``SSLProtocol.max_size``), all of it touched when it is allocated: most of what an
# idle mailbox would cost (a bare aioimaplib session in IDLE holds 0.36 MiB, 0.26 of
# it this buffer). Ours start with 32 KiB (a TLS record is at most 16 KiB), grow to
# asyncio's size once a read fills the buffer (a FETCH of a backlog: fewer, bigger
# reads), and shrink again when the session goes idle.
TLS_READ_BUFFER = 32 * 1024
TLS_BULK_BUFFER = 256 * 1024


class _LeanSSLProtocol(sslproto.SSLProtocol):
    max_size = TLS_READ_BUFFER  # what the constructor allocates
    _ssl_buffer: bytearray
    _ssl_buffer_view: memoryview
    _want = TLS_READ_BUFFER  # the size of the next read's buffer

    def get_buffer(self, n: int) -> memoryview:
        if len(self._ssl_buffer) != self._want:
            self._resize(self._want)
        return self._ssl_buffer_view

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes >= len(self._ssl_buffer):
            self._want = TLS_BULK_BUFFER  # a read filled it: more is coming
        super().buffer_updated(nbytes)

    def shrink(self) -> None:
        self._want = TLS_READ_BUFFER
        if len(self._ssl_buffer) != TLS_READ_BUFFER:
            self._resize(TLS_READ_BUFFER)

    def _resize(self, size: int) -> None:
        self._ssl_buffer = bytearray(size)
        self._ssl_buffer_view = memoryview(self._ssl_buffer)


async def open_tls(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.BaseProtocol,
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    handshake_timeout: float,
) -> None:
    """What ``loop.create_connection(lambda: protocol, host, port, ssl=ctx)`` does
    (``protocol`` gets the TLS transport once the handshake is done), with the
    lean read buffer."""
    waiter = loop.create_future()
    lean = _LeanSSLProtocol(loop, protocol, ctx, waiter, server_hostname=host,
                            ssl_handshake_timeout=math.ceil(handshake_timeout))  # fmt: skip
    raw, _ = await loop.create_connection(lambda: lean, host, port)
    try:
        await waiter  # the handshake; connection_made has reached ``protocol`` then
    except BaseException:
        raw.close()
        raise


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str,
    handshake_timeout: float,
) -> asyncio.Transport:
    """``loop.start_tls`` (STARTTLS: upgrade ``transport`` in place) with the lean
    read buffer; the same steps asyncio takes, with our protocol class."""
    waiter = loop.create_future()
    lean = _LeanSSLProtocol(
        loop, protocol, ctx, waiter, server_hostname=server_hostname,
        call_connection_made=False, ssl_handshake_timeout=math.ceil(handshake_timeout),
    )  # fmt: skip
    # Paused first, so that no data reaches ``lean`` before it is connected.
    transport.pause_reading()
    transport.set_protocol(lean)
    made = loop.call_soon(lean.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return lean._app_transport


def shrink_read_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Back to the small read buffer (the session goes idle). Call between reads."""
    proto = getattr(transport, "_ssl_protocol", None)
    if isinstance(proto, _LeanSSLProtocol):
        proto.shrink()


def check_plaintext_allowed(tls: TlsSettings, host: str) -> None:
    """Refuse a plaintext connection that would carry the password off this machine."""
    if not tls.plaintext_allowed(host):
        raise InsecureConnectionError(
            f"refusing a plaintext connection to {host}: the password would travel unencrypted. "
            "Use TLS or STARTTLS, or set allow_insecure = true if you accept the risk."
        )
