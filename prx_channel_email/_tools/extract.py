"""Text of an attachment: text/*, HTML and PDF; for anything else, what it is.

Bounded in time and size, and never on the event loop: text and HTML are decoded
on a worker thread (HTML rendering is capped as for mail bodies); a PDF is read by
pypdf in a child process (``pdf_text.py``, run isolated) with a
memory limit, a page limit and a deadline after which it is killed. A hostile PDF
can make a parser loop or balloon; a thread could not be stopped, a process can.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import sys
from dataclasses import dataclass
from pathlib import Path

from prx_channel_email._mail.charsets import decode_bytes
from prx_channel_email._mail.mime_body import MAX_HTML_CHARS

PDF_TIMEOUT_SECS = 20.0
PDF_MAX_BYTES = 20 * 1024 * 1024
PDF_MAX_PAGES = 200
TEXT_MAX_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Extracted:
    """``text`` None when the file has none; ``note`` says why (or what it is)."""

    text: str | None
    note: str | None = None


def kind_of(content_type: str, filename: str, data: bytes) -> str:
    """ "pdf", "html", "text" or "other", from the declared type, the name and the bytes."""
    ctype = content_type.lower().split(";")[0].strip()
    guessed = (mimetypes.guess_type(filename, strict=False)[0] or "").lower()
    if ctype == "application/pdf" or data[:5] == b"%PDF-" or guessed == "application/pdf":
        return "pdf"
    if ctype in ("text/html", "application/xhtml+xml") or guessed == "text/html":
        return "html"
    if ctype.startswith("text/") or ctype in ("application/json", "application/xml"):
        return "text"
    if ctype == "application/octet-stream" and guessed.startswith("text/"):
        return "text"
    return "other"


def describe(content_type: str, filename: str, size: int) -> str:
    return f"{filename} is {content_type or 'a file of unknown type'}, {size} bytes: it has no text"


async def extract(content_type: str, filename: str, data: bytes, max_chars: int) -> Extracted:
    kind = kind_of(content_type, filename, data)
    if kind == "other":
        return Extracted(None, describe(content_type, filename, len(data)))
    if kind == "pdf":
        return await _pdf(data, max_chars)
    if len(data) > TEXT_MAX_BYTES:
        data = data[:TEXT_MAX_BYTES]
    if kind == "html":
        return Extracted(await asyncio.to_thread(_html, data))
    text = await asyncio.to_thread(decode_bytes, data, None)
    return Extracted(text.replace("\r\n", "\n"))


def _html(data: bytes) -> str:
    from prx_channel_email._mail.html_text import html_to_text

    return html_to_text(decode_bytes(data, None)[:MAX_HTML_CHARS])


async def _pdf(data: bytes, max_chars: int) -> Extracted:
    if len(data) > PDF_MAX_BYTES:
        return Extracted(None, f"the PDF is {len(data)} bytes, above {PDF_MAX_BYTES}: not read")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # isolated: the child imports pypdf and nothing of the environment's
        str(Path(__file__).with_name("pdf_text.py")),
        str(max_chars + 1),
        str(PDF_MAX_PAGES),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(PDF_TIMEOUT_SECS):
            out, err = await proc.communicate(data)
    except TimeoutError:
        return Extracted(None, f"reading the PDF took longer than {PDF_TIMEOUT_SECS:g} s: stopped")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode == 3:
        return Extracted(None, "PDF text needs pypdf: pip install 'prx-channel-email[pdf]'")
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()[-1:] or ["unreadable"]
        return Extracted(None, f"the PDF could not be read: {reason[0][:200]}")
    text = out.decode("utf-8", errors="replace")
    if not text.strip():
        return Extracted(None, "the PDF holds no extractable text (scanned images?)")
    return Extracted(text)
