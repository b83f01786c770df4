"""The framework-facing contract: the messages that cross the channel boundary.

These types are what an agent framework programs against; they know nothing of
IMAP or SMTP. Inbound mail becomes a :class:`ChannelMessage`; the agent answers
with a :class:`SendMessage`, usually built by :meth:`ChannelMessage.reply` so the
answer lands in the same thread of the person's mail client.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class QuarantinedMessage(BaseModel):
    """Mail the policy quarantined (never handed on): whose it is and why, never its
    body, which stays unread on the server where it was. ``id`` names it for
    ``prx-email quarantine`` (``folder:uidvalidity:uid``)."""

    model_config = ConfigDict(frozen=True)

    id: str
    account: str
    message_id: str
    sender: str
    subject: str
    reason: str
    received_at: float


class Attachment(BaseModel):
    """One attachment of an inbound message.

    ``path`` is where it was saved, or None when it was not saved; then
    ``skipped_reason`` says why (too large, type not allowed, ...).
    """

    model_config = ConfigDict(frozen=True)

    filename: str
    content_type: str
    size: int
    path: Path | None = None
    skipped_reason: str | None = None


class SendMessage(BaseModel):
    """An outbound message.

    A framework that knows nothing of email may pass only ``content`` and
    ``recipient``: the channel then threads the message onto the latest mail it
    received from that recipient. ``in_reply_to`` (a ChannelMessage id) or
    ``thread_ts`` (a conversation key) choose the parent explicitly.

    ``idempotency_key``: a second send with a key the outbox already holds sends
    nothing and returns the first send's Message-ID, so a framework that retries a
    send after a timeout never mails twice. :meth:`ChannelMessage.reply` fills it.
    """

    content: str
    recipient: str
    subject: str | None = None
    in_reply_to: str | None = None
    thread_ts: str | None = None
    attachments: list[Path] = Field(default_factory=list)
    idempotency_key: str | None = None
    # The account that sends it (its SMTP login and from_address). None: the account
    # of the parent, or the only one (several and no parent: SendError account_required).
    account: str | None = None


class ChannelMessage(BaseModel):
    """An accepted inbound email, normalized.

    ``id`` is the Message-ID (angle brackets included, or a stable synthetic one);
    ``content`` is only the new text (quoted history and signature removed) while
    ``full_text`` keeps the whole body; ``thread_ts`` is the conversation key (the
    first Message-ID of References, else In-Reply-To, else ``id``).
    ``reply_target`` is the Reply-To only when that address may itself write to the
    bot, else ``sender``.
    ``sender_verified`` is True when a trusted server vouched for the From domain,
    False when it said the check failed, None when no trusted server said anything.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    sender: str
    sender_display: str | None = None
    reply_target: str
    subject: str = ""
    content: str = ""
    full_text: str = ""
    channel: str = "email"
    timestamp: int
    thread_ts: str
    in_reply_to: str | None = None
    references: list[str] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    sender_verified: bool | None = None
    # Handed on in an earlier run and not acknowledged there (handoff="ack"), or the
    # one message a kill interrupted (handoff="queue"): the host may have seen it.
    redelivered: bool = False
    # Where it came from: the account's name ("default" for a single-account config)
    # and the IMAP folder it was found in.
    account: str = "default"
    folder: str = "INBOX"

    def reply(self, content: str, **kw: Any) -> SendMessage:
        """Build the threaded answer to this message (to its reply target, "Re: subject").

        Its ``idempotency_key`` is derived from this message's id and ``content``:
        sending the same reply twice (a retried send) mails it once.
        """
        fields: dict[str, Any] = {
            "content": content,
            "recipient": self.reply_target,
            "in_reply_to": self.id,
            "thread_ts": self.thread_ts,
            "idempotency_key": reply_key(self.id, content),
            "account": self.account,  # the answer leaves from the address that got the mail
        }
        fields.update(kw)
        return SendMessage(**fields)


#: The stored form of a message (see :func:`pack_message`).
_PACKED = "prx-message/1 "


#: Characters of a stored message encoded at a time when it is written in pieces.
PACK_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class PackedMessage:
    """The stored form of a message, kept in pieces: ``parts`` joined is the text
    :func:`unpack_message` reads. The pieces are the message's own strings, so a
    24 MB body is not copied into a third string before the database copies it;
    a backend that can write in pieces (SQLite's blob I/O) never joins them."""

    parts: tuple[str, ...]

    def __str__(self) -> str:
        return "".join(self.parts)

    def __len__(self) -> int:
        return sum(map(len, self.parts))

    def encoded(self, chunk: int = PACK_CHUNK_CHARS) -> Iterator[bytes]:
        """The UTF-8 bytes of the joined text, at most ``chunk`` characters at a time."""
        for part in self.parts:
            for at in range(0, len(part), chunk):
                yield part[at : at + chunk].encode()

    def encoded_size(self) -> int:
        """len(str(self).encode()), without building either."""
        return sum(
            len(part) if part.isascii() else sum(len(b) for b in PackedMessage((part,)).encoded())
            for part in self.parts
        )


def pack_message(message: ChannelMessage) -> PackedMessage:
    """A message as stored while it waits (in flight, deferred): its small fields as
    JSON, then the body texts as they are, so a body is never JSON-escaped (24 MB of
    ``"`` was 48 MB per copy) and ``content`` is not stored twice when it is the
    whole text (a message with nothing to strip)."""
    if "\x00" in message.content or "\x00" in message.full_text:
        # a text column of some databases takes no NUL
        return PackedMessage((message.model_dump_json(),))
    head = message.model_dump(mode="json", exclude={"content", "full_text"})
    same = message.content == message.full_text
    head["_lengths"] = [-1 if same else len(message.content), len(message.full_text)]
    meta = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
    texts = (message.full_text,) if same else (message.content, message.full_text)
    return PackedMessage((f"{_PACKED}{len(meta)}\n{meta}", *texts))


def packed_fields(data: str | bytes) -> dict[str, Any]:
    """The small fields of a stored message (``thread_ts``, ``sender`` ...), without
    building its texts: what the storage layer reads of a waiting message."""
    text = data.decode() if isinstance(data, bytes) else data
    if not text.startswith(_PACKED):
        found: dict[str, Any] = json.loads(text)
        return found
    size, _, rest = text[len(_PACKED) :].partition("\n")
    head: dict[str, Any] = json.loads(rest[: int(size)])
    head.pop("_lengths", None)
    return head


def unpack_message(data: str | bytes) -> ChannelMessage:
    """The message :func:`pack_message` stored (or the JSON form of older rows).
    Raises ValueError when ``data`` is neither."""
    text = data.decode() if isinstance(data, bytes) else data
    if not text.startswith(_PACKED):
        return ChannelMessage.model_validate_json(text)
    size, _, rest = text[len(_PACKED) :].partition("\n")
    head = json.loads(rest[: int(size)])
    content_len, full_len = head.pop("_lengths")
    at = int(size)
    if content_len < 0:
        full = content = rest[at : at + full_len]
    else:
        content = rest[at : at + content_len]
        full = rest[at + content_len : at + content_len + full_len]
    if len(full) != full_len:
        raise ValueError("a stored message is cut short")
    return ChannelMessage.model_validate({**head, "content": content, "full_text": full})


def reply_key(parent_id: str, content: str) -> str:
    """The idempotency key of the reply ``content`` to the message ``parent_id``."""
    digest = hashlib.sha256(f"{parent_id}\0{content}".encode("utf-8", "surrogatepass"))
    return f"reply:{digest.hexdigest()}"


class Channel(abc.ABC):
    """What an agent framework needs from any channel (email, chat, ...)."""

    name: str

    @abc.abstractmethod
    async def listen(self, queue: asyncio.Queue[ChannelMessage]) -> None:
        """Put every accepted inbound message on ``queue`` once; run until cancelled.

        Survives server restarts, dropped connections and bad mail.
        """

    @abc.abstractmethod
    async def send(self, message: SendMessage) -> None:
        """Return once the server accepted the message or it is durably queued for retry.

        Raises SendError for permanent failures (rejected recipient, failed
        authentication, bad input).
        """

    @abc.abstractmethod
    async def health_check(self) -> bool:
        """True when the channel can currently receive and send."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; pending outbound mail stays queued for the next start."""
