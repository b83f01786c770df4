"""The envelope: the ChannelMessage fields the headers alone decide.

Enough for the policy and for threading, read before (and without) the body.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from datetime import UTC

from prx_channel_email._mail.addresses import (
    AMBIGUOUS_SENDER,
    NO_SENDER,
    parse_mailboxes,
    readable_mailboxes,
)
from prx_channel_email._mail.charsets import decode_words
from prx_channel_email._mail.headers import Headers
from prx_channel_email._mail.message_ids import normalize_id, parse_id_list, synthetic_message_id


def sender_of(headers: Headers) -> tuple[str | None, str, str | None]:
    """(display name, address, problem) of the one From mailbox.

    Exactly one From field holding exactly one well-formed mailbox, or the
    problem (NO_SENDER, AMBIGUOUS_SENDER) and an empty address. Sender is never
    used instead: it names whoever submitted the mail, not its author, and mail
    whose From cannot be read is not trusted to anyone's name.
    """
    fields = headers.get_all("from")
    if len(fields) > 1:
        return None, "", AMBIGUOUS_SENDER
    found = parse_mailboxes(fields[0]) if fields else []
    if not found:
        return None, "", NO_SENDER
    if len(found) > 1:
        return None, "", AMBIGUOUS_SENDER
    only = found[0]
    if isinstance(only, str):
        return None, "", only
    return only[0], only[1], None


def parse_timestamp(value: str | None, arrival: float) -> int:
    """Unix seconds of a Date header (its zone honoured; -0000 read as UTC), else arrival."""
    if value:
        try:
            when = email.utils.parsedate_to_datetime(decode_words(value))
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return int(when.timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return int(arrival)


@dataclass(frozen=True)
class Envelope:
    """What the headers alone say: enough for policy and for threading."""

    message_id: str
    sender: str
    sender_display: str | None
    reply_target: str
    subject: str
    timestamp: int
    thread_ts: str
    in_reply_to: str | None
    references: list[str]
    headers: Headers = field(repr=False, compare=False)
    # Why ``sender`` is empty: NO_SENDER or AMBIGUOUS_SENDER (None when it is set).
    sender_problem: str | None = None


def header_message_id(value: str | None) -> str | None:
    """The Message-ID a Message-ID header value names (encoded words decoded), or None.

    The transport's early duplicate check uses it too: both must read the same id.
    """
    return normalize_id(decode_words(value))


def envelope(
    headers: Headers, id_source: bytes, arrival: float, message_id: str | None = None
) -> Envelope:
    """The header-derived ChannelMessage fields; ``id_source`` seeds a missing Message-ID.

    ``message_id``: the identity the transport already decided on; used as is.
    """
    message_id = (
        message_id
        or header_message_id(headers.get("message-id"))
        or synthetic_message_id(id_source)
    )
    display, sender, problem = sender_of(headers)
    reply_to = readable_mailboxes(headers.get("reply-to"))
    references = parse_id_list(decode_words(headers.get("references")))
    in_reply_to = next(iter(parse_id_list(decode_words(headers.get("in-reply-to")))), None)
    thread_ts = references[0] if references else (in_reply_to or message_id)
    return Envelope(
        message_id=message_id,
        sender=sender,
        sender_display=display,
        reply_target=reply_to[0][1] if reply_to else sender,
        subject=headers.text("subject"),
        timestamp=parse_timestamp(headers.get("date"), arrival),
        thread_ts=thread_ts,
        in_reply_to=in_reply_to,
        references=references,
        headers=headers,
        sender_problem=problem,
    )
