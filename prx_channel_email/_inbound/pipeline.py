"""The inbound pipeline: raw RFC 5322 bytes -> parse/normalize -> policy -> Outcome.

Order matters for safety and cost: the (bounded) header block is read first and
the policy decides on headers alone, so refused mail is never parsed further and
never has an attachment written. Accepted mail is parsed once (the header block
already read is not parsed again; see mime_body.parse_message), its text
extracted and stripped (within a wall-clock budget, after which ``content`` is
the whole text), and its attachments saved. No exception escapes
:meth:`InboundPipeline.process`: what cannot be understood becomes a
``quarantine`` outcome with a logged reason, so one bad message never stops the
listener.

Crash safety: the pipeline keeps no durable state of its own. Attachments are
written (atomically, to a directory derived from a hash of the raw message
bytes) before the outcome is returned; if the process dies before the sync
engine records the outcome, the message is processed again and the same files
are overwritten. The directory is not derived from the Message-ID: a different
message claiming the same id (a forgery, or one the transport only later drops
as a duplicate) must never overwrite the files of the message that owns it.

Big messages (above THREAD_THRESHOLD) are handled on a worker thread from the
first step on, header reading included, so the event loop never does work
proportional to a hostile message's size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prx_channel_email._inbound import attachments as att
from prx_channel_email._inbound.policy import ROLLOUT, UNVERIFIED, Decision, Policy
from prx_channel_email._mail.envelope import Envelope, envelope
from prx_channel_email._mail.headers import Headers, body_start, split_header_block
from prx_channel_email._mail.message_ids import synthetic_message_id
from prx_channel_email._mail.mime_body import Body, TooComplex, parse_message, read_body
from prx_channel_email._mail.reply_text import STRIP_BUDGET_SECS, StripBudgetExceeded, new_text
from prx_channel_email._storage import LedgerEntry
from prx_channel_email._support.observability import Metrics, log_event
from prx_channel_email.config import EmailConfig
from prx_channel_email.models import Attachment, ChannelMessage

logger = logging.getLogger("prx_channel_email.inbound")

# bytes: above this, parsing runs on a worker thread (a thread hop costs ~0.1 ms; 57 KB
# of hostile MIME once cost the loop 630 ms).
THREAD_THRESHOLD = 16 * 1024
QUARANTINE_TOO_COMPLEX = "mime_too_complex"
QUARANTINE_PARSE_ERROR = "parse_error"
QUARANTINE_INTERNAL = "internal_error"


@dataclass(frozen=True)
class Outcome:
    """What the pipeline decided about one message.

    ``deliver``: ``message`` goes on the framework's queue and ``entry`` into the ledger.
    ``reject``: the policy refused it (``reason`` says why); the server copy is left alone.
    ``quarantine``: it could not be understood at all; logged with ``reason``.
    ``skip``: allowed, but its sender is outside ``rollout_percent`` (``reason``
    ``rollout``): left untouched on the server for people, logged and counted.

    A rejection also carries who sent it and its subject (so a host's
    ``on_rejected`` can say what was refused) and the policy's ``detail``.
    """

    decision: Literal["deliver", "reject", "quarantine", "skip"]
    message_id: str
    reason: str | None = None
    message: ChannelMessage | None = None
    entry: LedgerEntry | None = None
    sender: str | None = None
    subject: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class _Parsed:
    full_text: str
    content: str
    planned: list[att.Planned]
    key: str = ""  # att.message_key of the raw bytes: names the attachment directory
    strip_timed_out: bool = False  # stripping ran out of time: content is full_text


def message_identity(
    raw: bytes, header_id: str | None, *, oversized_size: int | None = None
) -> str:
    """The id a message is known by: its header Message-ID, else a hash of its bytes.

    ``raw`` is the whole message, or only its header block when it was too large to
    download (``oversized_size``); the size then seeds the hash too.
    """
    if header_id is not None:
        return header_id
    if oversized_size is not None:
        return synthetic_message_id(_oversized_id_source(raw, oversized_size))
    return synthetic_message_id(raw)


def _oversized_id_source(header_block: bytes, size: int) -> bytes:
    return split_header_block(header_block)[0] + str(size).encode()


def read_envelope(
    raw: bytes, arrival: float, message_id: str | None = None
) -> tuple[int, Envelope]:
    """Read the (capped) header block (CPU only: thread-safe).

    Returns where the body starts too: the header block is read here once, and the
    body parser is never given it again (nor a copy of the body).
    """
    at = body_start(raw)
    return at, envelope(Headers.from_block(raw[:at]), raw, arrival, message_id)


def analyze_body(raw: bytes, config: EmailConfig, env: Envelope, body_at: int) -> _Parsed:
    """Parse, extract text, strip quotes and plan attachments (CPU only: thread-safe)."""
    msg = parse_message(env.headers, raw, body_at)
    found: Body = read_body(msg)
    planned = att.plan(found.attachments, config)
    key = att.message_key(raw) if any(p.data is not None for p in planned) else ""
    try:
        content, timed_out = new_text(found.full_text, budget=STRIP_BUDGET_SECS), False
    except StripBudgetExceeded:
        content, timed_out = found.full_text.strip(), True
    return _Parsed(found.full_text, content, planned, key, timed_out)


def build_message(
    env: Envelope, decision: Decision, parsed: _Parsed, files: list[Attachment]
) -> ChannelMessage:
    """The ChannelMessage of accepted mail: the listener and the mailbox tools build it here."""
    return ChannelMessage(
        id=env.message_id,
        sender=env.sender,
        sender_display=env.sender_display,
        reply_target=decision.reply_target or env.sender,
        subject=env.subject,
        content=parsed.content,
        full_text=parsed.full_text,
        timestamp=env.timestamp,
        thread_ts=env.thread_ts,
        in_reply_to=env.in_reply_to,
        references=env.references,
        attachments=files,
        sender_verified=decision.sender_verified,
    )


def _read_oversized(
    header_block: bytes, size: int, arrival: float, message_id: str | None = None
) -> Envelope:
    block, _ = split_header_block(header_block)
    return envelope(Headers.from_block(block), block + str(size).encode(), arrival, message_id)


class InboundPipeline:
    def __init__(
        self,
        config: EmailConfig,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.policy = Policy(config, clock)

    async def process(
        self,
        raw: bytes,
        *,
        arrival: float | None = None,
        message_id: str | None = None,
        release: str | None = None,
    ) -> Outcome:
        """Decide on one fetched message. Never raises (except cancellation).

        ``message_id``: the identity the caller already decided on (see
        :func:`message_identity`); read from the headers when not given.
        ``release``: the quarantine reason the operator released it from (see
        :meth:`Policy.decide`).
        """
        when = self.clock() if arrival is None else arrival
        env: Envelope | None = None
        try:
            if len(raw) > THREAD_THRESHOLD:
                body_at, env_ = await asyncio.to_thread(read_envelope, raw, when, message_id)
            else:
                body_at, env_ = read_envelope(raw, when, message_id)
            env = env_
            decision = self.policy.decide(env, release=release)
            if decision.reason is not None:
                return self._reject(env, decision)
            if len(raw) > THREAD_THRESHOLD:
                parsed = await asyncio.to_thread(analyze_body, raw, self.config, env, body_at)
            else:
                parsed = analyze_body(raw, self.config, env, body_at)
            return await self._deliver(env, decision, parsed, when)
        except asyncio.CancelledError:
            raise
        except TooComplex as exc:
            return self._quarantine(raw, env, QUARANTINE_TOO_COMPLEX, exc, message_id)
        except Exception as exc:
            code = QUARANTINE_PARSE_ERROR if env is not None else QUARANTINE_INTERNAL
            return self._quarantine(raw, env, code, exc, message_id)

    # --- look-ups (the mailbox tools): the same decisions, nothing recorded or saved ---

    def judge(
        self, header_block: bytes, *, arrival: float, message_id: str | None = None
    ) -> tuple[Envelope, Decision]:
        """The policy's verdict from a header block, as :meth:`process` would decide it.

        Nothing is counted, logged or remembered: a look-up is not a delivery.
        CPU only (thread-safe).
        """
        _, env = read_envelope(header_block, arrival, message_id)
        return env, self.policy.decide(env, record=False)

    def look(
        self,
        raw: bytes,
        *,
        arrival: float,
        message_id: str | None = None,
        enforce: bool = True,
    ) -> ChannelMessage | None:
        """The ChannelMessage :meth:`process` would hand on for ``raw``, attachments not
        saved (their ``path`` is None); None when the policy refuses it (``enforce``) or
        it cannot be read. CPU only (thread-safe): big mail belongs on a worker thread.
        """
        try:
            body_at, env = read_envelope(raw, arrival, message_id)
            decision = self.policy.decide(env, record=False)
            if decision.reason is not None:
                if enforce:
                    return None
                decision = Decision(None, decision.sender_verified)
            parsed = analyze_body(raw, self.config, env, body_at)
        except Exception as exc:  # the listener would quarantine it: never shown
            self._log(logging.DEBUG, "tools.unreadable", message_id=message_id,
                      code=QUARANTINE_PARSE_ERROR, error=type(exc).__name__)  # fmt: skip
            return None
        return build_message(env, decision, parsed, [p.meta for p in parsed.planned])

    async def process_oversized(
        self,
        header_block: bytes,
        size: int,
        *,
        arrival: float | None = None,
        message_id: str | None = None,
        release: str | None = None,
    ) -> Outcome:
        """Decide on mail above ``max_message_bytes`` from its header block alone.

        Accepted mail is delivered with its headers and a note instead of a body,
        so the agent can tell the sender it was too large.
        """
        when = self.clock() if arrival is None else arrival
        env: Envelope | None = None
        try:
            if len(header_block) > THREAD_THRESHOLD:
                env_ = await asyncio.to_thread(
                    _read_oversized, header_block, size, when, message_id
                )
            else:
                env_ = _read_oversized(header_block, size, when, message_id)
            env = env_
            decision = self.policy.decide(env, release=release)
            if decision.reason is not None:
                return self._reject(env, decision)
            self.metrics.inc("inbound.oversized")
            note = (
                f"[This message is {size} bytes, above the {self.config.max_message_bytes}"
                " byte limit; its body and attachments were not downloaded.]"
            )
            return await self._deliver(env, decision, _Parsed(note, note, []), when)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._quarantine(header_block, env, QUARANTINE_PARSE_ERROR, exc, message_id)

    # --- outcomes ---

    def _log(self, level: int, event: str, **fields: Any) -> None:
        log_event(
            logger, level, event, account=self.config.account, folder=self.config.imap_folder,
            **fields,
        )  # fmt: skip

    async def _deliver(
        self, env: Envelope, decision: Decision, parsed: _Parsed, when: float
    ) -> Outcome:
        if parsed.strip_timed_out:
            self.metrics.inc("inbound.strip_budget_exceeded")
            self._log(
                logging.WARNING,
                "inbound.strip_budget_exceeded",
                message_id=env.message_id,
                code="strip_budget_exceeded",
                chars=len(parsed.full_text),
            )
        files = [p.meta for p in parsed.planned]
        if any(p.data is not None for p in parsed.planned):
            files = await asyncio.to_thread(
                att.save, self.config.attachments_path, parsed.key, parsed.planned
            )
        for meta in files:
            if meta.skipped_reason is not None:
                self.metrics.inc(f"inbound.attachments.skipped.{meta.skipped_reason}")
                self._log(
                    logging.INFO,
                    "inbound.attachment_skipped",
                    message_id=env.message_id,
                    filename=meta.filename,
                    content_type=meta.content_type,
                    size=meta.size,
                    code=meta.skipped_reason,
                )
        if env.reply_target != env.sender:
            # A Reply-To is honoured only when it may write to the bot itself.
            self._log(
                logging.INFO,
                "inbound.reply_target",
                message_id=env.message_id,
                sender=env.sender,
                reply_to=env.reply_target,
                reply_target=decision.reply_target or env.sender,
                code="reply_to_not_allowed" if decision.reply_to_refused else "reply_to_allowed",
            )
        message = build_message(env, decision, parsed, files)
        entry = LedgerEntry(
            message_id=env.message_id,
            received_at=when,
            sender=message.sender,
            reply_target=message.reply_target,
            subject=message.subject,
            thread_ts=message.thread_ts,
            references=message.references,
        )
        self.metrics.inc("inbound.delivered")
        self._log(
            logging.INFO,
            "inbound.delivered",
            message_id=env.message_id,
            sender=env.sender,
            sender_verified=decision.sender_verified,
            attachments=len(files) or None,
        )
        return Outcome("deliver", env.message_id, message=message, entry=entry)

    def _outside_rollout(self, env: Envelope) -> Outcome:
        self.metrics.inc("inbound.rollout_skipped")
        self._log(logging.INFO, "inbound.rollout_skipped", message_id=env.message_id,
                  sender=env.sender, code=ROLLOUT,
                  rollout_percent=self.config.rollout_percent)  # fmt: skip
        return Outcome("skip", env.message_id, reason=ROLLOUT, sender=env.sender,
                       subject=env.subject)  # fmt: skip

    def _reject(self, env: Envelope, decision: Decision) -> Outcome:
        if decision.reason == ROLLOUT:  # not refused: left for people
            return self._outside_rollout(env)
        reason = decision.reason or "rejected"
        self.metrics.inc(f"inbound.skipped.{reason}")
        extra: dict[str, Any] = {}
        kind: Literal["reject", "quarantine"]
        if decision.quarantine:
            # An allowed sender's mail refused on a signal a person's mail can
            # carry too: never handed on, but said loudly, with who and what.
            self.metrics.inc("inbound.quarantined")
            level, event, kind = logging.WARNING, "inbound.quarantined", "quarantine"
            extra["subject"] = env.subject
        else:
            # A refusal that repeats for every mail of a sender (unverified) is
            # explained once per sender; the repeats are logged at debug level.
            event, kind = "inbound.rejected", "reject"
            level = logging.INFO
            if not decision.first_for_sender:
                level = logging.DEBUG
            elif reason == UNVERIFIED:
                level = logging.WARNING
        sender = env.sender or None
        detail = decision.detail or None
        self._log(level, event, message_id=env.message_id, sender=sender, **extra,
                  code=reason, detail=detail)  # fmt: skip
        return Outcome(kind, env.message_id, reason=reason, sender=sender,
                       subject=env.subject, detail=detail)  # fmt: skip

    def _quarantine(
        self,
        raw: bytes,
        env: Envelope | None,
        reason: str,
        exc: BaseException,
        known_id: str | None = None,
    ) -> Outcome:
        fallback = known_id or synthetic_message_id(raw)
        message_id = env.message_id if env is not None else fallback
        self.metrics.inc("inbound.quarantined")
        self._log(
            logging.WARNING,
            "inbound.quarantined",
            message_id=message_id,
            sender=env.sender if env is not None else None,
            code=reason,
            error=f"{type(exc).__name__}: {str(exc)[:200]}",
        )
        return Outcome("quarantine", message_id, reason=reason)
