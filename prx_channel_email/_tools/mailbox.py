"""MailboxTools: what an agent may look up in its mailbox, and (opt-in) change.

Every operation asks the server (IMAP SEARCH) and downloads only what it shows:
the header blocks of the messages it examines (the policy decides on headers, as
the listener does, so hidden mail's body is never downloaded) and the bodies of
the messages on the page. A message is shown only when the channel's own policy
(``InboundPipeline.judge`` / ``look``, the listener's code) would hand it on,
unless ``tools_scope = "all"``. A hidden message and a missing one raise the same
``not_found`` error, with the same text; nothing counts hidden mail.

Results are plain JSON-able dicts (see :mod:`render` for the delimiter around
every text from mail). Writes (mark_read, move, send, reply) refuse with
``tools_read_only`` unless the account's ``tools_write`` is true, and find their
message the way ``get`` does, so they never touch hidden mail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prx_channel_email._inbound.attachments import plan
from prx_channel_email._inbound.pipeline import THREAD_THRESHOLD, InboundPipeline, read_envelope
from prx_channel_email._mail.envelope import Envelope
from prx_channel_email._mail.message_ids import normalize_id
from prx_channel_email._mail.mime_body import parse_message, read_body
from prx_channel_email._net.imap import FetchedMessage
from prx_channel_email._net.imap_compat import quote
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._outbound.compose import reply_subject
from prx_channel_email._support.observability import log_event
from prx_channel_email._tools import cursor as cursors
from prx_channel_email._tools.criteria import any_of, id_criteria, search_criteria, within
from prx_channel_email._tools.extract import extract
from prx_channel_email._tools.render import Boundary
from prx_channel_email._tools.sessions import IDLE_CLOSE_SECS, AccountSessions, Mailbox
from prx_channel_email.config import EmailConfig
from prx_channel_email.errors import ChannelError, FolderNotFoundError, TransportError
from prx_channel_email.models import ChannelMessage, SendMessage

log = logging.getLogger("prx_channel_email.tools")

MAX_LIMIT = 50
DEFAULT_LIMIT = 20
SNIPPET_CHARS = 300
LINE_CHARS = 500  # subject, display name, file name
THREAD_MAX_MESSAGES = 50
THREAD_MAX_KEYS = 20
# Bytes of bodies fetched in one UID FETCH (a page of big mail is several commands).
BODY_BATCH_BYTES = 8 * 1024 * 1024
HEADER_ITEMS = "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])"
# UIDs the first search of a page covers (later windows double: see MailboxTools._page).
FIRST_WINDOW = 256

Send = Callable[[SendMessage], Awaitable[str]]


@dataclass(frozen=True)
class ToolAccount:
    """One account the tools serve: its settings and the channel's pipeline for it
    (whose policy holds the live allow-list, runtime changes included)."""

    name: str
    config: EmailConfig
    pipeline: InboundPipeline
    #: The account's OAuth tokens, shared with the channel's connections (None: password).
    tokens: TokenManager | None = None

    @property
    def folders(self) -> list[str]:
        """The folders the channel watches (searched when no folder is named)."""
        watched = getattr(self.config, "imap_folders", None)
        return list(watched) if watched else [self.config.imap_folder]


@dataclass(frozen=True)
class _Seen:
    """A message examined by its header block (and shown: it passed the policy)."""

    folder: str
    uid: int
    header: bytes
    flags: frozenset[str]
    size: int
    env: Envelope


@dataclass(frozen=True)
class _Hit:
    """A shown message, downloaded and normalized."""

    account: ToolAccount
    seen: _Seen
    message: ChannelMessage
    raw: bytes


def not_found(message_id: str) -> ChannelError:
    """The one answer for a message that is absent or hidden (same code, same text)."""
    return ChannelError(f"no message {message_id!r} in this mailbox", code="not_found")


def read_only() -> ChannelError:
    return ChannelError(
        "the mailbox tools are read-only: set tools_write = true to let them mark,"
        " move or send mail",
        code="tools_read_only",
    )


class MailboxTools:
    """Search, read, thread and attachment text for the agent (see the module docstring).

    ``accounts``: name -> :class:`ToolAccount`; ``send``: the channel's
    ``send_message`` (the outbox, with its idempotency keys). The boundary token
    and the cursor key live as long as this object.
    """

    def __init__(
        self,
        accounts: Mapping[str, ToolAccount] | Iterable[ToolAccount],
        *,
        send: Send | None = None,
        prepare: Callable[[], Awaitable[object]] | None = None,
        idle_close_secs: float = IDLE_CLOSE_SECS,
    ) -> None:
        items = accounts.values() if isinstance(accounts, Mapping) else accounts
        # An account whose capabilities leave out "tools" is not served: as if absent.
        self._accounts = {a.name: a for a in items if "tools" in a.config.capabilities}
        self._sessions = {
            name: AccountSessions(a.config, name, tokens=a.tokens, idle_close_secs=idle_close_secs)
            for name, a in self._accounts.items()
        }
        self._send = send
        self._prepare = prepare
        self.boundary = Boundary()
        self._key = secrets.token_bytes(32)

    # --- about the tools themselves ---

    @property
    def accounts(self) -> list[str]:
        return list(self._accounts)

    @property
    def writable(self) -> bool:
        """True when some account allows writes (``tools_write``): hosts list the write tools."""
        return any(a.config.tools_write for a in self._accounts.values())

    def bytes_received(self) -> int:
        """Bytes the servers sent to the tools' sessions so far (for benchmarks)."""
        return sum(s.bytes_received for s in self._sessions.values())

    async def close(self) -> None:
        """Log out of every session the tools opened."""
        await asyncio.gather(*(s.close() for s in self._sessions.values()))

    async def _ready(self, account: str | None) -> list[ToolAccount]:
        """The accounts ``account`` names, once the channel is started (its runtime
        allow-list loaded from the state: the policy must be the listener's)."""
        if self._prepare is not None:
            await self._prepare()
        return self._pick(account)

    def _pick(self, account: str | None) -> list[ToolAccount]:
        if account is None or account == "":
            return list(self._accounts.values())
        found = self._accounts.get(account)
        if found is None:
            names = ", ".join(self._accounts)
            raise ChannelError(
                f"no account {account!r} (accounts: {names})", code="unknown_account"
            )
        return [found]

    # --- read ---

    async def list_folders(self, account: str | None = None) -> dict[str, Any]:
        """The folders of each account; ``watched``: the channel listens there. No
        counts: a count would include mail the tools do not show."""
        out: list[dict[str, Any]] = []
        for acct in await self._ready(account):
            names = await self._sessions[acct.name].run(lambda box: box.folders())
            watched = set(acct.folders)
            out += [{"account": acct.name, "name": n, "watched": n in watched} for n in names]
        return {"folders": out}

    async def search(
        self,
        query: str | None = None,
        *,
        sender: str | None = None,
        subject: str | None = None,
        since: Any = None,
        before: Any = None,
        unread: bool | None = None,
        folder: str | None = None,
        account: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of matching mail, newest first in each folder, and the cursor of the
        next page (None on the last). Each message is a summary with a ``snippet``;
        ``get`` returns the whole text."""
        limit = max(1, min(int(limit), MAX_LIMIT))
        arguments = {
            "query": query, "sender": sender, "subject": subject, "since": since,
            "before": before, "unread": unread, "folder": folder, "account": account,
        }  # fmt: skip
        digest = cursors.search_digest(arguments)
        pos = cursors.decode(self._key, digest, cursor) if cursor else cursors.Position()
        chosen = {"query": query, "sender": sender, "subject": subject, "since": since,
                  "before": before, "unread": unread}  # fmt: skip
        plain = search_criteria(**chosen)
        gmail = search_criteria(**chosen, gmail=True)
        accounts = await self._ready(account)
        boxes = [(a, f) for a in accounts for f in ([folder] if folder else a.folders)]
        if pos.index >= len(boxes):
            raise cursors.invalid()
        shown: list[dict[str, Any]] = []
        after: cursors.Position | None = None
        for index in range(pos.index, len(boxes)):
            acct, name = boxes[index]
            start = pos if index == pos.index else cursors.Position(index)
            need = limit - len(shown)

            async def page(
                box: Mailbox,
                acct: ToolAccount = acct,
                name: str = name,
                start: cursors.Position = start,
                index: int = index,
                need: int = need,
            ) -> tuple[list[dict[str, Any]], cursors.Position | None]:
                terms = gmail if "X-GM-EXT-1" in box.session.capabilities else plain
                return await self._page(acct, box, name, index, terms, start, need)

            found, after = await self._sessions[acct.name].run(page)
            shown += found
            if after is not None:
                break
        next_cursor = cursors.encode(self._key, digest, after) if after is not None else None
        return {"messages": shown, "next_cursor": next_cursor, "boundary": self.boundary.token}

    async def _page(
        self,
        acct: ToolAccount,
        box: Mailbox,
        folder: str,
        index: int,
        terms: list[str],
        start: cursors.Position,
        need: int,
    ) -> tuple[list[dict[str, Any]], cursors.Position | None]:
        """Up to ``need`` shown messages of one folder from ``start`` down, and where
        the next page starts when one more shown message exists here.

        The server searches a window of UIDs at a time, newest first, each window twice
        as wide as the one before: a page of recent matches costs the server a scan of
        recent mail, not of the whole folder (without a full-text index, a body search
        reads every message it covers), and a listing's answer is not every UID.
        """
        info = await box.select(folder, fresh=True)  # UIDNEXT now, not at the last page
        if start.below and start.uidvalidity != info.uidvalidity:
            raise cursors.invalid()  # the folder was rebuilt: its UIDs mean other mail now
        # The highest UID from what the server has: Courier's SELECT gives no UIDNEXT.
        top = start.below - 1 if start.below else await box.session.last_uid_at_select(folder, info)
        if top < 1:
            return [], None
        chosen: list[_Seen] = []
        after: cursors.Position | None = None
        batch_size = acct.config.fetch_batch_size
        width = max(FIRST_WINDOW, need + 1)
        while top >= 1 and after is None:
            low = max(1, top - width + 1)
            found = await box.session.uid_search(*within(terms, f"{low}:{top}"))
            uids = sorted((u for u in found if low <= u <= top), reverse=True)
            for at in range(0, len(uids), batch_size):
                batch = uids[at : at + batch_size]
                for seen in await self._examine(acct, box, folder, batch):
                    if len(chosen) < need:
                        chosen.append(seen)
                    else:  # one more shown message: the next page starts with it
                        after = cursors.Position(index, info.uidvalidity, seen.uid + 1)
                        break
                if after is not None:
                    break
            top, width = low - 1, width * 2
        hits = await self._download(acct, box, chosen)
        return [self._summary(h) for h in hits], after

    async def _examine(
        self, acct: ToolAccount, box: Mailbox, folder: str, uids: list[int]
    ) -> list[_Seen]:
        """The messages among ``uids`` (selected folder) that the tools show, in order."""
        fetched = await box.session.uid_fetch(uids, HEADER_ITEMS)
        out: list[_Seen] = []
        for uid in uids:
            item = fetched.get(uid)
            if item is None or item.data is None:
                continue  # expunged meanwhile
            env = await self._judge(acct, item.data)
            if env is not None:
                out.append(_seen(folder, uid, item, env))
        return out

    async def _judge(self, acct: ToolAccount, header: bytes) -> Envelope | None:
        """The envelope when the tools show this message, else None (the policy's call)."""
        arrival = time.time()
        if len(header) > THREAD_THRESHOLD:
            env, decision = await asyncio.to_thread(acct.pipeline.judge, header, arrival=arrival)
        else:
            env, decision = acct.pipeline.judge(header, arrival=arrival)
        if decision.reason is not None and acct.config.tools_scope != "all":
            return None
        return env

    async def _download(self, acct: ToolAccount, box: Mailbox, chosen: list[_Seen]) -> list[_Hit]:
        """Bodies of ``chosen`` (selected folder), normalized by the listener's code."""
        limit = acct.config.max_message_bytes
        raws: dict[int, bytes] = {}
        batch: list[_Seen] = []
        size = 0
        wanted = [s for s in chosen if s.size <= limit]
        for seen in wanted:
            if batch and size + seen.size > BODY_BATCH_BYTES:
                raws.update(await box.session.fetch_bodies([s.uid for s in batch], size))
                batch, size = [], 0
            batch.append(seen)
            size += seen.size
        if batch:
            raws.update(await box.session.fetch_bodies([s.uid for s in batch], size))
        hits: list[_Hit] = []
        for seen in chosen:
            if seen.size > limit:
                message = await self._look(acct, seen.header)
                if message is not None:
                    note = (
                        f"[This message is {seen.size} bytes, above the {limit} byte limit;"
                        " its body was not downloaded.]"
                    )
                    message = message.model_copy(update={"content": note, "full_text": note})
                raw = seen.header
            else:
                found = raws.get(seen.uid)
                if found is None:
                    continue  # expunged between the two fetches
                raw = found
                message = await self._look(acct, raw)
            if message is not None:
                hits.append(_Hit(acct, seen, message, raw))
        return hits

    async def _look(self, acct: ToolAccount, raw: bytes) -> ChannelMessage | None:
        enforce = acct.config.tools_scope != "all"
        if len(raw) > THREAD_THRESHOLD:
            return await asyncio.to_thread(
                acct.pipeline.look, raw, arrival=time.time(), enforce=enforce
            )
        return acct.pipeline.look(raw, arrival=time.time(), enforce=enforce)

    async def get(self, message_id: str, account: str | None = None) -> dict[str, Any]:
        """One message: every ChannelMessage field, its text whole (up to tools_max_chars)."""
        hit = await self._locate(message_id, await self._ready(account))
        return self._full(hit)

    async def thread(self, message_id: str, account: str | None = None) -> dict[str, Any]:
        """The conversation of ``message_id`` across the account's folders, oldest first.

        Found by References and In-Reply-To; each message's ``content`` is its new text
        (the quoted history is the other messages). At most THREAD_MAX_MESSAGES, the
        newest; ``omitted`` counts the older shown ones left out.
        """
        hit = await self._locate(message_id, await self._ready(account))
        root = hit.message
        keys = list(dict.fromkeys([root.thread_ts, *root.references, root.id]))
        if len(keys) > THREAD_MAX_KEYS:
            keys = [keys[0], *keys[-(THREAD_MAX_KEYS - 1) :]]
        terms = any_of(
            id_criteria("Message-ID", keys),
            id_criteria("References", keys),
            id_criteria("In-Reply-To", keys),
        )
        acct = hit.account

        async def collect(box: Mailbox) -> tuple[list[_Hit], int]:
            members: dict[str, _Seen] = {}
            for folder in await self._all_folders(acct, box):
                if not await _try_select(box, folder):
                    continue
                uids = await box.session.uid_search(*terms)
                batch_size = acct.config.fetch_batch_size
                for at in range(0, len(uids), batch_size):
                    for seen in await self._examine(acct, box, folder, uids[at : at + batch_size]):
                        env = seen.env
                        related = {env.message_id, env.in_reply_to, *env.references}
                        if related.intersection(keys):
                            members.setdefault(env.message_id, seen)
            ordered = sorted(members.values(), key=lambda m: (m.env.timestamp, m.uid))
            omitted = max(0, len(ordered) - THREAD_MAX_MESSAGES)
            kept = ordered[omitted:]
            hits: list[_Hit] = []
            by_folder: dict[str, list[_Seen]] = {}
            for seen in kept:
                by_folder.setdefault(seen.folder, []).append(seen)
            for folder, seens in by_folder.items():
                await box.select(folder)
                hits += await self._download(acct, box, seens)
            hits.sort(key=lambda h: (h.message.timestamp, h.seen.uid))
            return hits, omitted

        hits, omitted = await self._sessions[acct.name].run(collect)
        return {
            "thread_ts": root.thread_ts,
            "messages": [self._full(h, full_text=False) for h in hits],
            "omitted": omitted,
            "boundary": self.boundary.token,
        }

    async def attachment_text(
        self, message_id: str, filename: str, account: str | None = None
    ) -> dict[str, Any]:
        """The text of one attachment (text/*, HTML, PDF), bounded by tools_max_chars;
        for other files, what the file is and that it has no text."""
        hit = await self._locate(message_id, await self._ready(account))
        files = await asyncio.to_thread(_attachments, hit.raw, hit.account.config)
        chosen = files.get(filename)
        if chosen is None:
            folded = {k.casefold(): v for k, v in files.items()}
            chosen = folded.get(str(filename).casefold())
        if chosen is None:
            names = ", ".join(files) or "none"
            raise ChannelError(
                f"message {message_id!r} has no attachment {filename!r} (attachments: {names})",
                code="not_found",
            )
        name, ctype, data = chosen
        max_chars = hit.account.config.tools_max_chars
        got = await extract(ctype, name, data, max_chars)
        out: dict[str, Any] = {
            "message_id": hit.message.id,
            "account": hit.account.name,
            "folder": hit.seen.folder,
            "filename": self.boundary.line(name, LINE_CHARS)[0],
            "content_type": ctype,
            "size": len(data),
            "text": None,
            "note": got.note,
            "untrusted": True,
            "boundary": self.boundary.token,
        }
        if got.text is not None:
            out["text"], cut = self.boundary.wrap(got.text, max_chars)
            if cut:
                out["cut"] = {"text": cut}
        return out

    # --- finding one message ---

    async def _locate(self, message_id: str, accounts: list[ToolAccount]) -> _Hit:
        """The shown message with this Message-ID (watched folders first, then the
        others); ``not_found`` for a hidden one exactly as for a missing one."""
        wanted = normalize_id(str(message_id)) if message_id else None
        if wanted is None or any(ch in wanted for ch in "\r\n\x00"):
            raise not_found(str(message_id))
        for acct in accounts:

            async def find(box: Mailbox, acct: ToolAccount = acct) -> _Hit | None:
                for folder in await self._all_folders(acct, box):
                    if not await _try_select(box, folder):
                        continue
                    uids = await box.session.uid_search("HEADER", "Message-ID", quote(wanted))
                    if not uids:
                        continue
                    seens = [
                        s
                        for s in await self._examine(acct, box, folder, uids)
                        if s.env.message_id == wanted
                    ]
                    for hit in await self._download(acct, box, seens):
                        return hit
                return None

            found = await self._sessions[acct.name].run(find)
            if found is not None:
                return found
        raise not_found(str(message_id))

    async def _all_folders(self, acct: ToolAccount, box: Mailbox) -> list[str]:
        """The watched folders first, then every other folder of the account."""
        return list(dict.fromkeys([*acct.folders, *await box.folders()]))

    # --- write (tools_write) ---

    async def _writable(self, account: str | None) -> list[ToolAccount]:
        allowed = [a for a in await self._ready(account) if a.config.tools_write]
        if not allowed:
            raise read_only()
        return allowed

    async def mark_read(self, message_id: str, account: str | None = None) -> dict[str, Any]:
        """Set ``\\Seen`` on a shown message."""
        hit = await self._locate(message_id, await self._writable(account))

        async def mark(box: Mailbox) -> None:
            await box.select(hit.seen.folder)
            await box.session.store_flags([hit.seen.uid], "(\\Seen)")

        await self._sessions[hit.account.name].run(mark)
        self._wrote("tools.marked_read", hit)
        return {"ok": True, "message_id": hit.message.id, "account": hit.account.name,
                "folder": hit.seen.folder}  # fmt: skip

    async def move(
        self, message_id: str, folder: str, account: str | None = None
    ) -> dict[str, Any]:
        """Move a shown message to ``folder`` (which must exist)."""
        accounts = await self._writable(account)
        if not folder or any(ch in folder for ch in "\r\n\x00"):
            raise ChannelError("folder: a folder name is required", code="invalid_argument")
        hit = await self._locate(message_id, accounts)

        async def move(box: Mailbox) -> None:
            names = await box.session.list_folders()
            if folder not in names:
                raise FolderNotFoundError(folder, names)
            if folder == hit.seen.folder:
                return
            await box.select(hit.seen.folder)
            await box.session.move([hit.seen.uid], folder)

        await self._sessions[hit.account.name].run(move, retry=False)
        self._wrote("tools.moved", hit, to=folder)
        return {"ok": True, "message_id": hit.message.id, "account": hit.account.name,
                "folder": folder}  # fmt: skip

    async def send(
        self,
        content: str,
        recipient: str,
        *,
        subject: str | None = None,
        account: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send through the channel's outbox, like ``channel.send``. The same content to
        the same recipient is sent once (the idempotency key is derived from them)."""
        acct = (await self._writable(account))[0]
        key = (
            idempotency_key
            or "tools:"
            + hashlib.sha256(
                f"{acct.name}\0{recipient}\0{subject}\0{content}".encode("utf-8", "surrogatepass")
            ).hexdigest()[:40]
        )
        message = SendMessage(
            content=content,
            recipient=recipient,
            subject=subject,
            idempotency_key=key,
            **self._account_field(acct, account),
        )
        sent = await self._deliver(message)
        log_event(log, logging.INFO, "tools.sent", account=acct.name, message_id=sent)
        return {"sent": True, "message_id": sent, "recipient": recipient}

    async def reply(
        self,
        message_id: str,
        content: str,
        *,
        account: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Answer a shown message in its thread (to its reply target), through the outbox."""
        hit = await self._locate(message_id, await self._writable(account))
        parent = hit.message
        extra: dict[str, Any] = {"subject": reply_subject(parent.subject)}
        extra.update(self._account_field(hit.account, account))
        if idempotency_key:
            extra["idempotency_key"] = idempotency_key
        message = parent.reply(content, **extra)
        sent = await self._deliver(message)
        self._wrote("tools.replied", hit, sent=sent)
        return {"sent": True, "message_id": sent, "in_reply_to": parent.id,
                "recipient": message.recipient}  # fmt: skip

    def _account_field(self, acct: ToolAccount, asked: str | None) -> dict[str, Any]:
        """SendMessage.account when the model has it and more than one account exists."""
        if "account" in SendMessage.model_fields and (asked or len(self._accounts) > 1):
            return {"account": acct.name}
        return {}

    async def _deliver(self, message: SendMessage) -> str:
        if self._send is None:
            raise ChannelError(
                "these tools were made without a way to send", code="send_unavailable"
            )
        return await self._send(message)

    def _wrote(self, event: str, hit: _Hit, **fields: Any) -> None:
        log_event(log, logging.INFO, event, account=hit.account.name, folder=hit.seen.folder,
                  uid=hit.seen.uid, message_id=hit.message.id, **fields)  # fmt: skip

    # --- results ---

    def _base(self, hit: _Hit) -> dict[str, Any]:
        msg, line = hit.message, self.boundary.line
        subject, subject_cut = line(msg.subject, LINE_CHARS)
        display = line(msg.sender_display, LINE_CHARS)[0] if msg.sender_display else None
        out: dict[str, Any] = {
            "id": msg.id,
            "account": hit.account.name,
            "folder": hit.seen.folder,
            "channel": msg.channel,
            "sender": msg.sender,
            "sender_display": display,
            "reply_target": msg.reply_target,
            "subject": subject,
            "timestamp": msg.timestamp,
            "date": dt.datetime.fromtimestamp(msg.timestamp, tz=dt.UTC).isoformat(),
            "thread_ts": msg.thread_ts,
            "in_reply_to": msg.in_reply_to,
            "references": list(msg.references),
            "sender_verified": msg.sender_verified,
            "unread": "\\seen" not in hit.seen.flags,
            "attachments": [
                {
                    "filename": line(a.filename, LINE_CHARS)[0],
                    "content_type": a.content_type,
                    "size": a.size,
                }
                for a in msg.attachments
            ],
            "untrusted": True,
            "boundary": self.boundary.token,
        }
        if subject_cut:
            out["cut"] = {"subject": subject_cut}
        return out

    def _summary(self, hit: _Hit) -> dict[str, Any]:
        out = self._base(hit)
        limit = min(SNIPPET_CHARS, hit.account.config.tools_max_chars)
        out["snippet"], cut = self.boundary.wrap(" ".join(hit.message.content.split()), limit)
        if cut:
            out.setdefault("cut", {})["snippet"] = cut
        return out

    def _full(self, hit: _Hit, *, full_text: bool = True) -> dict[str, Any]:
        out = self._base(hit)
        limit = hit.account.config.tools_max_chars
        fields = {"content": hit.message.content}
        if full_text:
            fields["full_text"] = hit.message.full_text
        for name, text in fields.items():
            out[name], cut = self.boundary.wrap(text, limit)
            if cut:
                out.setdefault("cut", {})[name] = cut
        return out


def _seen(folder: str, uid: int, item: FetchedMessage, env: Envelope) -> _Seen:
    return _Seen(
        folder=folder,
        uid=uid,
        header=item.data or b"",
        flags=item.flags or frozenset(),
        size=item.size or 0,
        env=env,
    )


async def _try_select(box: Mailbox, folder: str) -> bool:
    """Select ``folder``; False for one that cannot be (gone, or not selectable)."""
    try:
        await box.select(folder)
    except TransportError:
        raise
    except ChannelError:
        return False
    return True


def _attachments(raw: bytes, config: EmailConfig) -> dict[str, tuple[str, str, bytes]]:
    """name -> (name, content type, bytes) of every attachment, named as the
    ChannelMessage names them (the listener's safe, unique file names)."""
    body_at, env = read_envelope(raw, time.time())
    found = read_body(parse_message(env.headers, raw, body_at)).attachments
    named = plan(found, config)
    return {
        p.meta.filename: (p.meta.filename, item.content_type, item.data)
        for item, p in zip(found, named, strict=True)
    }
