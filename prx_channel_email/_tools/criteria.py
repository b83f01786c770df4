"""A search's arguments as IMAP SEARCH criteria: the server does the searching.

Gmail's own query language (``X-GM-RAW``) is used for ``query`` where the server
offers it (capability ``X-GM-EXT-1``); elsewhere ``query`` is a ``TEXT`` search
(headers and body). Dates are whole days, as IMAP has them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prx_channel_email._net.imap_compat import quote
from prx_channel_email.errors import ChannelError

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_ARGUMENT_CHARS = 500


def imap_date(value: Any, name: str) -> str:
    """``2026-01-05`` (or a date/datetime) as IMAP's ``5-Jan-2026``."""
    day: dt.date
    if isinstance(value, dt.datetime):
        day = value.date()
    elif isinstance(value, dt.date):
        day = value
    else:
        text = str(value).strip()
        try:
            day = dt.date.fromisoformat(text[:10])
        except ValueError:
            raise ChannelError(
                f"{name}: {text[:40]!r} is not a date (YYYY-MM-DD)", code="invalid_argument"
            ) from None
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def _text(value: Any, name: str) -> str:
    text = str(value)
    if any(ch in text for ch in "\r\n\x00"):
        raise ChannelError(f"{name}: line breaks are not allowed", code="invalid_argument")
    if len(text) > MAX_ARGUMENT_CHARS:
        raise ChannelError(
            f"{name}: at most {MAX_ARGUMENT_CHARS} characters", code="invalid_argument"
        )
    return text


def search_criteria(
    *,
    query: str | None = None,
    sender: str | None = None,
    subject: str | None = None,
    since: Any = None,
    before: Any = None,
    unread: bool | None = None,
    gmail: bool = False,
) -> list[str]:
    """The SEARCH arguments (without a UID range); ``ALL`` when nothing narrows it."""
    terms: list[str] = []
    texts: list[str] = []
    if query:
        texts.append(_text(query, "query"))
        terms += ["X-GM-RAW" if gmail else "TEXT", quote(texts[-1])]
    if sender:
        texts.append(_text(sender, "sender"))
        terms += ["FROM", quote(texts[-1])]
    if subject:
        texts.append(_text(subject, "subject"))
        terms += ["SUBJECT", quote(texts[-1])]
    if since is not None and since != "":
        terms += ["SINCE", imap_date(since, "since")]
    if before is not None and before != "":
        terms += ["BEFORE", imap_date(before, "before")]
    if unread is True:
        terms.append("UNSEEN")
    elif unread is False:
        terms.append("SEEN")
    if not terms:
        terms.append("ALL")
    if any(not t.isascii() for t in texts):
        terms = ["CHARSET", "UTF-8", *terms]
    return terms


def within(terms: list[str], uids: str) -> list[str]:
    """``terms`` limited to the UID set ``uids`` (after CHARSET, which must come first)."""
    if terms[:1] == ["CHARSET"]:
        return [*terms[:2], "UID", uids, *terms[2:]]
    return ["UID", uids, *terms]


def id_criteria(field: str, ids: list[str]) -> list[str]:
    """``OR HEADER f a OR HEADER f b HEADER f c``: any of ``ids`` in header ``field``."""
    terms: list[str] = []
    for i, mid in enumerate(ids):
        if i < len(ids) - 1:
            terms.append("OR")
        terms += ["HEADER", field, quote(mid)]
    return terms


def any_of(*groups: list[str]) -> list[str]:
    """OR of several criteria groups (each a complete search key list)."""
    present = [g for g in groups if g]
    terms: list[str] = []
    for i, group in enumerate(present):
        if i < len(present) - 1:
            terms.append("OR")
        terms.append("(" + " ".join(group) + ")")
    return terms
