"""A scripted IMAP server on loopback, for faults a real Dovecot cannot produce on demand.

It speaks just enough IMAP4rev1 for the sync engine (LOGIN, CAPABILITY, ID, LIST,
SELECT, UID SEARCH/FETCH/STORE/COPY/EXPUNGE, IDLE, NOOP, LOGOUT) over plaintext,
with knobs for the faults: a login answered ``NO [UNAVAILABLE]``, a capability
list without MOVE, a ``BYE`` during IDLE that leaves the socket open, IDLE
advertised but refused. Every
command received is kept in ``commands`` so tests can check what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

_SET_RE = re.compile(r"(\d+|\*)(?::(\d+|\*))?")


@dataclass
class FakeMailbox:
    uidvalidity: int = 1000
    messages: dict[int, bytes] = field(default_factory=dict)
    flags: dict[int, set[str]] = field(default_factory=dict)
    next_uid: int = 1

    def add(self, raw: bytes) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.messages[uid] = raw
        self.flags[uid] = set()
        return uid


class FakeImapServer:
    def __init__(
        self,
        *,
        capabilities: tuple[str, ...] = ("IMAP4rev1", "IDLE", "UIDPLUS", "ID"),
        login_reply: str = "OK Logged in",
        bye_in_idle: bool = False,
        refuse_idle: bool = False,
    ) -> None:
        self.capabilities = capabilities
        self.login_reply = login_reply
        self.bye_in_idle = bye_in_idle
        self.refuse_idle = refuse_idle
        self.folders: dict[str, FakeMailbox] = {"INBOX": FakeMailbox(), "Done": FakeMailbox()}
        self.commands: list[str] = []
        # uid -> how many more body FETCHes leave it out (a server syncing internally)
        self.omit_body: dict[int, int] = {}
        self.omit_meta: dict[int, int] = {}  # the same, for the size/Message-ID FETCH
        self.answer_logout = True  # False: a slow server that never answers LOGOUT
        self.logout_seen = asyncio.Event()
        self.logins = 0
        self.idling = asyncio.Event()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._idlers: set[asyncio.StreamWriter] = set()

    def deliver(self, raw: bytes, folder: str = "INBOX") -> int:
        """Add a message and announce it to every client idling (as a real server does)."""
        box = self.folders[folder]
        uid = box.add(raw)
        for w in self._idlers:
            w.write(f"* {len(box.messages)} EXISTS\r\n".encode())
        return uid

    async def start(self) -> FakeImapServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        selected: FakeMailbox | None = None

        def send(text: str | bytes) -> None:
            writer.write(text if isinstance(text, bytes) else text.encode() + b"\r\n")

        send("* OK fake IMAP ready")
        try:
            while True:
                line = (await reader.readline()).decode().rstrip("\r\n")
                if not line:
                    return
                self.commands.append(line)
                tag, _, rest = line.partition(" ")
                cmd, _, args = rest.partition(" ")
                cmd = cmd.upper()
                if cmd == "UID":
                    sub, _, args = args.partition(" ")
                    cmd = "UID " + sub.upper()
                if cmd == "CAPABILITY":
                    send("* CAPABILITY " + " ".join(self.capabilities))
                    send(f"{tag} OK done")
                elif cmd == "LOGIN":
                    self.logins += 1
                    send(f"{tag} {self.login_reply}")
                elif cmd in ("ID", "NOOP"):
                    send(f"{tag} OK done")
                elif cmd == "LIST":
                    for name in self.folders:
                        send(f'* LIST () "/" {name}')
                    send(f"{tag} OK done")
                elif cmd == "SELECT":
                    name = args.strip('"')
                    selected = self.folders.get(name)
                    if selected is None:
                        send(f"{tag} NO Mailbox doesn't exist")
                        continue
                    send(f"* {len(selected.messages)} EXISTS")
                    send(f"* OK [UIDVALIDITY {selected.uidvalidity}] ok")
                    send(f"* OK [UIDNEXT {selected.next_uid}] ok")
                    send(f"{tag} OK [READ-WRITE] done")
                elif cmd == "IDLE" and self.refuse_idle:
                    send(f"{tag} NO IDLE is not allowed here")
                elif cmd == "IDLE":
                    send("+ idling")
                    self.idling.set()
                    if self.bye_in_idle:
                        send("* BYE going away, but keeping the socket open")
                        await writer.drain()
                        await reader.read()  # never answer again
                        return
                    self._idlers.add(writer)
                    try:
                        done = await reader.readline()
                    finally:
                        self._idlers.discard(writer)
                    self.idling.clear()
                    self.commands.append(done.decode().strip())
                    send(f"{tag} OK idle done")
                elif cmd == "LOGOUT":
                    self.logout_seen.set()
                    if not self.answer_logout:
                        await reader.read()  # hold the line, say nothing
                        return
                    send("* BYE bye")
                    send(f"{tag} OK done")
                    await writer.drain()
                    return
                elif selected is not None and cmd.startswith("UID "):
                    self._uid_command(cmd, args, tag, selected, send)
                else:
                    send(f"{tag} BAD unknown command")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _uid_command(self, cmd: str, args: str, tag: str, box: FakeMailbox, send: object) -> None:
        assert callable(send)
        uids = sorted(box.messages)
        if cmd == "UID SEARCH":
            crit = args.split()
            chosen = uids
            if crit and crit[0].upper() == "UID":
                chosen = _select(crit[1], uids)
            elif crit and crit[0].upper() == "UNSEEN":
                chosen = [u for u in uids if "\\Seen" not in box.flags[u]]
            send("* SEARCH " + " ".join(map(str, chosen)))
        elif cmd == "UID FETCH":
            uid_part, _, items = args.partition(" ")
            for uid in _select(uid_part, uids):
                raw = box.messages[uid]
                is_body = "BODY.PEEK[]" in items or "BODY[]" in items
                omit = self.omit_body if is_body else self.omit_meta
                if ("HEADER.FIELDS" in items or is_body) and omit.get(uid, 0) > 0:
                    omit[uid] -= 1
                    continue
                header = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                seq = uids.index(uid) + 1
                if "HEADER.FIELDS" in items:
                    wanted = (b"message-id", b"from")
                    fields = [h for h in header.split(b"\r\n") if h.lower().startswith(wanted)]
                    data = b"\r\n".join(fields) + b"\r\n\r\n"
                    name = "BODY[HEADER.FIELDS (MESSAGE-ID FROM)]"
                elif "HEADER" in items:
                    data, name = header, "BODY[HEADER]"
                else:
                    data, name = raw, "BODY[]"
                size = f" RFC822.SIZE {len(raw)}" if "RFC822.SIZE" in items else ""
                send(f"* {seq} FETCH (UID {uid}{size} {name} {{{len(data)}}}".encode() + b"\r\n")
                send(data + b")\r\n")
        elif cmd == "UID STORE":
            uid_part, _, rest = args.partition(" ")
            flags = re.findall(r"\\\w+", rest)
            for uid in _select(uid_part, uids):
                box.flags[uid].update(flags)
        elif cmd == "UID COPY":
            uid_part, _, target = args.partition(" ")
            for uid in _select(uid_part, uids):
                self.folders[target.strip('"')].add(box.messages[uid])
        elif cmd == "UID EXPUNGE":
            for uid in _select(args, uids):
                if "\\Deleted" in box.flags[uid]:
                    del box.messages[uid]
                    del box.flags[uid]
        else:
            send(f"{tag} BAD unsupported")
            return
        send(f"{tag} OK done")


def _select(spec: str, uids: list[int]) -> list[int]:
    top = max(uids, default=0)
    chosen: set[int] = set()
    for part in spec.split(","):
        m = _SET_RE.fullmatch(part)
        if not m:
            continue
        lo = top if m.group(1) == "*" else int(m.group(1))
        hi = lo if m.group(2) is None else (top if m.group(2) == "*" else int(m.group(2)))
        lo, hi = min(lo, hi), max(lo, hi)
        chosen.update(u for u in uids if lo <= u <= hi)
    return sorted(chosen)
