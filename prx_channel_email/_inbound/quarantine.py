"""Releasing quarantined mail: what may be released, and the request both callers make.

Quarantined mail stays unread on the server; its ledger row (keyed by the mail:
account, folder, UIDVALIDITY, UID) says why. A release is a durable request in
the state (:meth:`Storage.request_release`), so the CLI, which runs in another
process than the listener, asks the same way a host does. The listener serving
that mailbox carries it out in its next sync pass (``sync.py``): it fetches the
mail again, runs the whole pipeline with only the quarantine decision that held
it set aside, and hands it on through the ordinary hand-off (in flight, then the
queue), marking the request done in that same commit. A process that dies
between the request and the hand-off leaves the request pending: the next start
carries it out, once.

What is releasable:

* ``own_mail`` (an allowed sender's mail naming us in Reply-To): the Reply-To no
  longer counts; replies go to the sender, never to us.
* the pipeline's failures (``parse_error``, ``mime_too_complex``,
  ``internal_error``, ``pipeline_error:...``): read again; handed on only if it
  now reads and passes the whole policy, else the release fails with
  ``quarantine_unreadable`` and the mail stays quarantined.
* never ``unverified_sender`` (the provider's ``temperror`` under ``enforce``):
  a release cannot vouch for a sender the provider could not check.

The allow-list and authenticity always decide again: a release never lets a
stranger or a forged sender through (``quarantine_release_refused``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from prx_channel_email._inbound.pipeline import (
    QUARANTINE_INTERNAL,
    QUARANTINE_PARSE_ERROR,
    QUARANTINE_TOO_COMPLEX,
)
from prx_channel_email._inbound.policy import UNVERIFIED
from prx_channel_email._storage import (
    RELEASE_DONE,
    RELEASE_FAILED,
    RELEASE_PENDING,
    MailKey,
    ReleaseRequest,
    Storage,
)
from prx_channel_email._support.observability import log_event
from prx_channel_email.errors import ChannelError

log = logging.getLogger("prx_channel_email.inbound")

#: Quarantine reasons a release cannot set aside (see the module's docstring).
NOT_RELEASABLE = (UNVERIFIED,)
#: The pipeline's own failures: reading it again is the whole release.
_PIPELINE_FAILURES = (QUARANTINE_PARSE_ERROR, QUARANTINE_TOO_COMPLEX, QUARANTINE_INTERNAL)
PIPELINE_ERROR_PREFIX = "pipeline_error:"


def unreadable(reason: str | None) -> bool:
    """True for a quarantine the pipeline decided on because it could not read the mail."""
    return bool(reason) and (
        reason in _PIPELINE_FAILURES or str(reason).startswith(PIPELINE_ERROR_PREFIX)
    )


def release_id(key: MailKey) -> str:
    """The id the operator names a quarantined mail by (``folder:uidvalidity:uid``)."""
    return f"{key.folder}:{key.uidvalidity}:{key.uid}"


def parse_release_id(account: str, text: str) -> MailKey:
    """The mail ``text`` (as :func:`release_id` wrote it) names; a folder may hold ``:``."""
    folder, _, rest = str(text).strip().rpartition(":")
    folder, _, uv = folder.rpartition(":")
    if not folder or not uv.isdigit() or not rest.isdigit():
        raise ChannelError(
            f"{text!r} is not a quarantine id (folder:uidvalidity:uid, as"
            " `prx-email quarantine list` shows it)",
            code="invalid_argument",
        )
    return MailKey(account, folder, int(uv), int(rest))


async def request_release(store: Storage, key: MailKey, id_: str) -> ReleaseRequest:
    """Record the operator's request to release ``key`` (durable when this returns).

    A ChannelError names why not: ``quarantine_unknown`` (no quarantined mail with
    that id), ``quarantine_already_released`` (released or handed on before, or a
    release of it is under way), ``quarantine_not_releasable`` (its reason is one a
    release cannot set aside).
    """
    asked = await store.request_release(key, refuse=NOT_RELEASABLE)
    if asked is None:
        raise ChannelError(
            f"no quarantined mail {id_!r} in {key.account} (see `prx-email quarantine list`)",
            code="quarantine_unknown",
        )
    if asked.state == RELEASE_DONE:
        raise ChannelError(
            f"{id_} was released (or handed on) already", code="quarantine_already_released"
        )
    if not asked.new and asked.state == RELEASE_PENDING:
        raise ChannelError(
            f"a release of {id_} is already under way", code="quarantine_already_released"
        )
    if not asked.new:
        raise ChannelError(
            f"{id_} cannot be released: quarantined as {asked.reason} (the provider could"
            " not check the sender, and a release cannot vouch for it); ask the sender to"
            " send it again",
            code="quarantine_not_releasable",
        )
    log_event(log, logging.INFO, "inbound.quarantine_release_requested", account=key.account,
              folder=key.folder, uid=key.uid, message_id=asked.message_id,
              reason=asked.reason)  # fmt: skip
    return asked


async def wait_released(store: Storage, key: MailKey, id_: str, within: float) -> ReleaseRequest:
    """Wait (bounded) until the listener carried the request out: the request once done;
    a ChannelError with the failure's code once failed, or ``quarantine_release_pending``
    after ``within`` seconds (the request stays: the listener carries it out later)."""
    deadline = time.monotonic() + within
    pause = 0.05
    while True:
        found = await store.release_request(key)
        if found is not None and found.state == RELEASE_DONE:
            return found
        if found is not None and found.state == RELEASE_FAILED:
            code = found.code or "quarantine_release_refused"
            raise ChannelError(f"{id_} was not released: {found.detail or code}", code=code)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChannelError(
                f"the release of {id_} is requested, but no listener handed it on within"
                f" {within:g} s; it stays requested and is handed on once the mailbox is"
                " served (`prx-email run`, or the host's listen())",
                code="quarantine_release_pending",
            )
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)
