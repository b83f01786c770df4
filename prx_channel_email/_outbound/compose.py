"""Compose a reply: SendMessage + parent -> RFC 5322 bytes.

Everything that decides what the recipient's mail client shows lives here:
threading headers (so the reply joins the conversation), a subject without
stacked prefixes, RFC 3834 ``Auto-Submitted`` (so other robots stay quiet), the
Markdown -> HTML alternative with raw HTML escaped, and attachments. Header
values are checked for CR/LF/NUL before anything is built, so no caller input can
add a header. The result is plain bytes: the outbox stores them before the first
attempt so every retry sends the very same message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import html
import mimetypes
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import encode_rfc2231, format_datetime, formataddr, getaddresses
from pathlib import Path
from typing import TYPE_CHECKING

from prx_channel_email._mail.message_ids import (
    STAMP_HEADER,
    channel_stamp,
    mint_message_id,
    normalize_id,
    parse_id_list,
)
from prx_channel_email._storage.interface import MailKey
from prx_channel_email.config import EmailConfig, is_address
from prx_channel_email.config.slices import ConfigSlice
from prx_channel_email.errors import SendError

if TYPE_CHECKING:
    from markdown_it import MarkdownIt

#: References longer than this keep only the first id and the most recent ones.
MAX_REFERENCES = 20

_FORBIDDEN = ("\r", "\n", "\x00")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls (but tab) and DEL
# Reply prefixes in common languages (Re, AW = German, SV = Nordic, Antw = Dutch,
# Odp = Polish, Vs = Finnish, RIF = Italian); "Fwd:" is deliberately not one.
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|aw|sv|antw|odp|vs|rif)(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]\s*)+",
    re.IGNORECASE,
)
CRLF = "\r\n"


@dataclass(frozen=True)
class Parent:
    """What a reply needs to know of the message it answers."""

    message_id: str
    subject: str
    references: list[str]
    # The received mail it is (None when known only by its ids): a reply settles it.
    key: MailKey | None = None


@dataclass(frozen=True)
class Composed:
    """A finished message and its envelope, ready to be stored and sent."""

    message_id: str
    mail_from: str
    recipient: str
    raw: bytes


def _fold_ids(name: str, value: str) -> str:
    """Fold a list of Message-IDs between ids, never inside one (an encoded word breaks it)."""
    lines: list[str] = []
    line = f"{name}:"
    for mid in value.split():
        if len(line) + 1 + len(mid) > 78 and line != f"{name}:":
            lines.append(line)
            line = ""
        line = f"{line} {mid}"
    lines.append(line)
    return CRLF.join(lines)


def _unstructured(name: str, value: str) -> str:
    """``Name: value`` folded at spaces; RFC 2047 encoded words when not ASCII."""
    if value.isascii():
        lines: list[str] = []
        line = f"{name}:"
        for word in value.split(" "):
            # Fold only before a real word: a continuation line must not be all blanks.
            if len(line) + 1 + len(word) > 78 and line.strip() and word:
                lines.append(line)
                line = ""
            line = f"{line} {word}"
        lines.append(line)
        if all(len(x) <= 998 for x in lines):
            return CRLF.join(lines)
    encoded = Header(value, "utf-8", header_name=name).encode(linesep=CRLF)
    return f"{name}: {encoded}"


def _qp(text: str) -> bytes:
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    if not data.endswith(b"\n"):
        data += b"\n"
    return binascii.b2a_qp(data, quotetabs=False, istext=True).replace(b"\n", b"\r\n")


def _text_part(subtype: str, text: str) -> bytes:
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}"
    )
    return head.encode("ascii") + _qp(text)


def _file_part(name: str, ctype: str, data: bytes) -> bytes:
    if name.isascii() and name.isprintable() and not any(c in name for c in '"\\'):
        param = f'filename="{name}"'
    else:  # RFC 2231: percent-encoded UTF-8, so no byte of the name can break the header
        param = f"filename*={encode_rfc2231(name, 'utf-8')}"
    head = (
        f"Content-Type: {ctype}{CRLF}Content-Disposition: attachment; {param}{CRLF}"
        f"Content-Transfer-Encoding: base64{CRLF}{CRLF}"
    )
    return head.encode("ascii") + base64.encodebytes(data).replace(b"\n", b"\r\n")


def _multipart(subtype: str, parts: list[bytes]) -> tuple[str, bytes]:
    """A multipart body; returns its Content-Type header value and the body bytes."""
    boundary = f"=_prx_{secrets.token_hex(12)}"
    sep = f"--{boundary}{CRLF}".encode("ascii")
    body = b"".join(sep + part + (b"" if part.endswith(b"\r\n") else b"\r\n") for part in parts)
    body += f"--{boundary}--{CRLF}".encode("ascii")
    return f'multipart/{subtype}; boundary="{boundary}"', body


def check_header_value(field: str, value: str) -> str:
    """Refuse CR, LF and NUL: they are the only way to smuggle in another header."""
    if any(ch in value for ch in _FORBIDDEN):
        raise SendError(
            f"{field} contains a line break or NUL character; refusing to send "
            "(this would let the text inject extra mail headers)",
            code="header_injection",
        )
    return value


def reply_subject(parent_subject: str) -> str:
    """``Re: <subject>`` with any stack of earlier reply prefixes collapsed into one."""
    base = _REPLY_PREFIX.sub("", parent_subject).strip()
    return f"Re: {base}" if base else "Re:"


def thread_references(parent: Parent, limit: int = MAX_REFERENCES) -> list[str]:
    """The parent's References plus the parent's id; very long chains keep first + newest."""
    refs = [r for r in parent.references if _is_ascii_id(r)]
    refs.append(parent.message_id)
    seen: set[str] = set()
    unique: list[str] = []
    for mid in refs:
        if mid not in seen:
            seen.add(mid)
            unique.append(mid)
    if len(unique) > limit:
        unique = [unique[0], *unique[-(limit - 1) :]]
    return unique


# Longer ids are left out of In-Reply-To/References: they cannot be folded, and a
# header line over 998 characters makes servers refuse the whole reply.
MAX_ID_CHARS = 900


def _is_ascii_id(mid: str) -> bool:
    return mid.isascii() and len(mid) <= MAX_ID_CHARS and parse_id_list(mid) == [mid]


def parse_recipient(value: str) -> str:
    """The bare address of ``value`` (``a@b`` or ``Name <a@b>``), or SendError.

    Exactly one address, taken as written: the parser's habit of quietly dropping
    control characters or everything after a comma must not change who gets the mail.
    """
    check_header_value("recipient", value)
    found = getaddresses([value.strip()])
    addr = found[0][1].strip() if len(found) == 1 else ""
    if _CONTROL_RE.search(value) or addr not in value:
        addr = ""
    if not addr or not is_address(addr):
        raise SendError(
            f"recipient {value!r} is not a valid email address",
            code="bad_recipient",
            recipient=value,
        )
    local, _, domain = addr.rpartition("@")
    if not local.isascii():
        raise SendError(
            f"recipient {value!r} has a non-ASCII local part, which this channel cannot send to",
            code="bad_recipient",
            recipient=value,
        )
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise SendError(
            f"recipient {value!r} has an invalid domain", code="bad_recipient", recipient=value
        ) from None
    return f"{local}@{domain}"


@functools.cache
def _markdown() -> MarkdownIt:
    """Built on the first reply: markdown-it costs a listening channel ~3 MB at rest."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
        ["table", "strikethrough"]
    )


#: Markdown is rendered only up to this size and this many inline markup characters:
#: markdown-it's inline rules cost up to ~100 us per such character (1 MB of
#: ``![[](`` took 30 s of CPU). Over either, the HTML part is the text, escaped.
MARKDOWN_MAX_CHARS = 200_000
MARKDOWN_MAX_MARKUP = 4_000
_MARKUP_CHARS = "[]!*_\\&<`"


def _markdown_is_bounded(text: str) -> bool:
    if len(text) > MARKDOWN_MAX_CHARS:
        return False
    return sum(text.count(c) for c in _MARKUP_CHARS) <= MARKDOWN_MAX_MARKUP


def render_html(markdown: str) -> str:
    """The agent's Markdown as an HTML document; raw HTML in it is shown, not run.
    A reply over the Markdown bounds is shown as preformatted text instead."""
    if _markdown_is_bounded(markdown):
        body = _markdown().render(markdown)
    else:
        body = f'<pre style="white-space: pre-wrap">{html.escape(markdown)}</pre>\n'
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head>\n'
        f"<body>\n{body}</body></html>\n"
    )


def _read_attachments(paths: list[Path], cap: int) -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []
    total = 0
    for path in paths:
        name = Path(path).name
        try:
            size = Path(path).stat().st_size
            if size > cap or total + size > cap:
                raise SendError(
                    f"attachment {name!r} makes the message too large "
                    f"({total + size} bytes, the limit is {cap})",
                    code="attachment_too_large",
                )
            data = Path(path).read_bytes()
        except SendError:
            raise
        except OSError as exc:
            raise SendError(
                f"attachment {name!r} cannot be read: {exc.strerror or exc}",
                code="attachment_unreadable",
            ) from None
        total += len(data)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        out.append((name, ctype, data))
    return out


@dataclass(frozen=True)
class ComposeSettings(ConfigSlice):
    """What composing a message reads of the config (the names are EmailConfig's)."""

    account: str
    from_address: str
    from_name: str | None
    default_subject: str
    max_outbound_attachment_bytes: int


def compose(
    settings: EmailConfig | ComposeSettings,
    *,
    content: str,
    recipient: str,
    subject: str | None = None,
    parent: Parent | None = None,
    attachments: list[Path] | None = None,
    message_id: str | None = None,
    now: datetime | None = None,
) -> Composed:
    """Build the whole message. Raises SendError for bad input; does file I/O (run in a thread)."""
    config = ComposeSettings.of(settings)
    rcpt = parse_recipient(recipient)
    for field, text in (("content", content), ("subject", subject or "")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from truncated model output
            raise SendError(f"{field} is not valid Unicode text", code="bad_input") from None
    if subject is not None:
        check_header_value("subject", subject)
    if config.from_name is not None:
        check_header_value("from_name", config.from_name)
    check_header_value("from_address", config.from_address)
    if not config.from_address.isascii():
        raise SendError(
            "from_address must be ASCII (internationalised addresses are not supported)",
            code="bad_from_address",
        )
    if subject is None:
        inherited = _CONTROL_RE.sub("", parent.subject) if parent is not None else ""
        if inherited.strip():
            subject = reply_subject(" ".join(inherited.split()))
        else:
            subject = config.default_subject
    # Control characters (but tab) never reach a header: CR/LF/NUL were refused above,
    # the rest (\x0b, \x0c, \x1c, DEL, ...) mean nothing in a subject and confuse parsers.
    subject = _CONTROL_RE.sub("", subject)
    from_name = _CONTROL_RE.sub("", config.from_name or "")
    mid = message_id or mint_message_id(config.from_address)
    files = _read_attachments(list(attachments or []), config.max_outbound_attachment_bytes)

    sender = formataddr((from_name, config.from_address), charset="utf-8")
    headers = [
        f"From: {sender}",
        f"To: {rcpt}",
        _unstructured("Subject", subject),
        f"Date: {format_datetime(now or datetime.now(UTC))}",
        f"Message-ID: {mid}",
    ]
    if parent is not None and _is_ascii_id(parent.message_id):
        headers.append(f"In-Reply-To: {parent.message_id}")
        headers.append(_fold_ids("References", " ".join(thread_references(parent))))
        headers.append("Auto-Submitted: auto-replied")
    else:
        headers.append("Auto-Submitted: auto-generated")
    # Exchange/Outlook ignore RFC 3834 but honour this.
    headers.append("X-Auto-Response-Suppress: All")
    # Recognises our own mail when it comes back rewritten (policy.loop_reason).
    headers.append(f"{STAMP_HEADER}: {channel_stamp(config.account)}")
    headers.append("MIME-Version: 1.0")
    ctype, body = _multipart(
        "alternative", [_text_part("plain", content), _text_part("html", render_html(content))]
    )
    if files:
        inner = f"Content-Type: {ctype}{CRLF}{CRLF}".encode("ascii") + body
        ctype, body = _multipart("mixed", [inner, *(_file_part(*f) for f in files)])
    headers.append(f"Content-Type: {ctype}")
    raw = (CRLF.join(headers) + CRLF + CRLF).encode("ascii") + body
    return Composed(
        message_id=mid,
        mail_from=config.from_address,
        recipient=rcpt,
        raw=raw,
    )


def parent_from_ids(in_reply_to: str | None, thread_ts: str | None) -> Parent | None:
    """A parent known only by its ids (not in the ledger): thread on them anyway."""
    mid = normalize_id(in_reply_to) or normalize_id(thread_ts)
    if mid is None:
        return None
    root = normalize_id(thread_ts)
    refs = [root] if root and root != mid else []
    return Parent(message_id=mid, subject="", references=refs)
