"""A real Dovecot (2.3) IMAP/LMTP server for tests, run from its own config file.

Each :class:`DovecotServer` owns a short temp directory holding its config,
runtime sockets, state, log, users file and mail. It listens on free loopback
ports only:

* ``imap_port``  - plain IMAP that offers STARTTLS (plain LOGIN is allowed too);
* ``imaps_port`` - implicit TLS with a certificate from the test CA (``ca_file``);
* ``lmtp_port``  - LMTP, used by :meth:`DovecotServer.deliver` to deliver mail
  the way a real MTA would (so IDLE clients see it arrive).

Each user has a passwd-file of its own that Dovecot reads on the user's first
lookup, so :meth:`DovecotServer.add_user` takes effect immediately without a
restart (a shared file would be re-read at most once per second).
Mailbox inspection and manipulation (``list_uids``, ``flags``, ``append``,
``recreate_folder`` ...) go through ``doveadm -c CONFIG``, i.e. through Dovecot
itself rather than by poking at maildir files.

Only Dovecot 2.3 is supported: 2.4 changed the configuration language.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import grp
import imaplib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .certs import TestPKI, make_pki

DOMAIN = "example.test"
DEFAULT_PASSWORD = "pass-word"
_DH_PARAMS = Path("/usr/share/dovecot/dh.pem")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_LIVE: weakref.WeakSet[DovecotServer] = weakref.WeakSet()


class DovecotError(RuntimeError):
    """Dovecot could not be started, or a doveadm command failed."""


@dataclass(frozen=True)
class Account:
    """One Dovecot user. ``username`` is a full address and is what IMAP LOGIN takes."""

    username: str
    password: str
    address: str


def find_binary(name: str) -> str:
    """Locate a Dovecot binary, also looking in sbin dirs that may be off PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise DovecotError(
        f"{name!r} not found. The real-server tests need Dovecot 2.3: install the Debian "
        "packages dovecot-imapd and dovecot-lmtpd (tests/run.sh does this)."
    )


_VERSION_CACHE: dict[str, str] = {}


def dovecot_version(binary: str) -> str:
    """``dovecot --version`` output, e.g. ``2.3.19.1 (9b53102964)``."""
    if binary not in _VERSION_CACHE:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        _VERSION_CACHE[binary] = out.stdout.strip() or out.stderr.strip()
    return _VERSION_CACHE[binary]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_is_bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _mail_owner() -> tuple[int, int, dict[str, str]]:
    """Pick the uid/gid that owns the mail, plus the process-user settings to use.

    Dovecot refuses to access mail as root, so as root the mail belongs to
    ``nobody``; Dovecot's own internal/login users stay the packaged defaults.
    When not root every Dovecot process runs as the current user.
    """
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError as exc:  # pragma: no cover - every Debian has nobody
            raise DovecotError("need a 'nobody' user to own the test mail") from exc
        return nobody.pw_uid, nobody.pw_gid, {}
    uid, gid = os.getuid(), os.getgid()
    user = pwd.getpwuid(uid).pw_name
    group = grp.getgrgid(gid).gr_name
    return (
        uid,
        gid,
        {
            "default_internal_user": user,
            "default_internal_group": group,
            "default_login_user": user,
        },
    )


class DovecotServer:
    """A Dovecot instance on loopback. See the module docstring.

    Use as a context manager or call :meth:`start` / :meth:`close`. ``idle=False``
    starts a variant that does not advertise the IDLE capability (neither before
    nor after login), for testing a client's polling fallback.
    """

    def __init__(
        self,
        *,
        idle: bool = True,
        pki: TestPKI | None = None,
        startup_timeout: float = 15.0,
        extra_config: str = "",
        oauth_introspection_url: str | None = None,
        namespace_prefix: str = "",
        separator: str = "/",
    ) -> None:
        self.idle = idle
        # Courier's layout is namespace_prefix="INBOX.", separator=".": every folder
        # lives under INBOX (Cyrus: "INBOX/" with unixhierarchysep).
        self.namespace_prefix = namespace_prefix
        self.separator = separator
        # With a URL, XOAUTH2/OAUTHBEARER logins are checked by an ``oauth2`` passdb
        # asking that RFC 7662 endpoint (tests/servers/oauth_server.py); LOGIN and
        # PLAIN keep using the passwd-files.
        self.oauth_introspection_url = oauth_introspection_url
        self.startup_timeout = startup_timeout
        self.extra_config = extra_config
        self.host = "127.0.0.1"
        self._dovecot = find_binary("dovecot")
        self._doveadm = find_binary("doveadm")
        version = dovecot_version(self._dovecot)
        if not version.startswith("2.3."):
            raise DovecotError(
                f"Dovecot {version!r} found at {self._dovecot}; these fixtures write a "
                "Dovecot 2.3 configuration (Debian 12's dovecot-imapd)."
            )
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd: int | None = None
        self._explicit_capability: str | None = None
        self._accounts: dict[str, Account] = {}
        # Short path: unix sockets under base_dir must stay < 108 bytes.
        tmp_root = "/tmp" if os.path.isdir("/tmp") else None
        self.root = Path(tempfile.mkdtemp(prefix="prxdc-", dir=tmp_root))
        # Dovecot's auth process runs as another user and must read the users file.
        self.root.chmod(0o755)
        self._uid, self._gid, self._process_users = _mail_owner()
        self.pki = pki if pki is not None else make_pki(self.root / "pki")
        self.mail_root = self.root / "mail"
        self.mail_root.mkdir()
        os.chown(self.mail_root, self._uid, self._gid)
        self.mail_root.chmod(0o755)
        # One passwd-file per user (see _write_user_file for why).
        self.users_dir = self.root / "users"
        self.users_dir.mkdir()
        self.users_dir.chmod(0o755)
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.imap_port, self.imaps_port, self.lmtp_port = free_ports(3, self.host)
        self.instance_name = f"prx-test-{secrets.token_hex(4)}"

    # ------------------------------------------------------------------ properties

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA that signed the server certificate."""
        return self.pki.ca_file

    @property
    def running(self) -> bool:
        """True while the Dovecot master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Dovecot master process, if started."""
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Write the config and start Dovecot; return once it serves IMAP.

        Raises :class:`DovecotError` with the tail of the Dovecot log if it does
        not come up within ``startup_timeout`` seconds.
        """
        if self.running:
            return
        if not self.idle and self._explicit_capability is None:
            # Learn the exact post-login capability list of this Dovecot build, then
            # restart with that list minus IDLE (see _discover_capability).
            self._launch(capability=None)
            try:
                caps = self._discover_capability()
            finally:
                self._terminate()
            self._explicit_capability = " ".join(c for c in caps if c.upper() != "IDLE")
        self._launch(capability=self._explicit_capability)

    def stop(self, *, graceful: bool = True) -> None:
        """Stop Dovecot (all its processes). Users and mail are kept for :meth:`start`.

        ``graceful=True`` is a normal shutdown: IMAP clients get
        ``* BYE Server shutting down.`` before the connection closes.
        ``graceful=False`` SIGKILLs everything at once, like a crash: clients see
        the connection close with no BYE.
        """
        self._terminate(graceful=graceful)

    def restart(self, *, graceful: bool = True) -> None:
        """Stop and start again on the same ports, keeping users and mail.

        Open client connections are dropped, as with a real server restart
        (``graceful`` as for :meth:`stop`).
        """
        self.stop(graceful=graceful)
        self._launch(capability=self._explicit_capability)

    def close(self) -> None:
        """Stop Dovecot and delete its directory (set PRX_KEEP_DOVECOT=1 to keep it)."""
        self._terminate()
        if os.environ.get("PRX_KEEP_DOVECOT"):
            return
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the Dovecot log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no dovecot log written)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ accounts

    def add_user(self, name: str | None = None, password: str = DEFAULT_PASSWORD) -> Account:
        """Create a new user with an empty mailbox and return its :class:`Account`.

        ``name`` may be a local part (``alice``) or a full address; by default a
        unique one like ``u7@example.test`` is generated. Local parts must not
        contain ``+`` (that is the folder-delivery delimiter) or ``:``.
        Dovecot sees the user at once (a new per-user passwd-file, and no auth
        cache). Addresses are lowercased, as Dovecot does with login names.
        """
        with self._lock:
            if name is None:
                local = f"u{next(self._counter)}"
                while f"{local}@{DOMAIN}" in self._accounts:
                    local = f"u{next(self._counter)}"
                username = f"{local}@{DOMAIN}"
            else:
                # Dovecot lowercases login names (auth_username_format = %Lu).
                username = (name if "@" in name else f"{name}@{DOMAIN}").lower()
            local_part = username.split("@", 1)[0]
            bad = {"+", ":", "/", "\n", " ", "%"}
            if (
                any(ch in local_part for ch in bad)
                or any(ch in username for ch in "/:% \n")
                or username.startswith(".")
                or ":" in password
                or "\n" in password
            ):
                raise ValueError(f"unsupported user name or password: {username!r}")
            if username in self._accounts:
                raise ValueError(f"user {username!r} already exists")
            account = Account(username=username, password=password, address=username)
            self._accounts[username] = account
            self._write_user_file(account)
        return account

    @property
    def accounts(self) -> list[Account]:
        """All accounts created so far."""
        with self._lock:
            return list(self._accounts.values())

    def _home(self, username: str) -> Path:
        return self.mail_root / username

    def _write_user_file(self, account: Account) -> None:
        """Write ``users/<username>``: a passwd-file holding just this user.

        Dovecot re-reads a changed passwd-file at most once per second (it skips
        the stat() when it already synced in the current second), so appending to
        one shared file makes a just-added user invisible for up to a second. A
        file per user, addressed as ``users/%u`` in the config, is read the first
        time that user is looked up, i.e. always fresh.
        """
        # passwd-file format: user:password:uid:gid:gecos:home:shell:extra-fields;
        # nodelay: answer a wrong password at once instead of after up to 2 s.
        line = (
            f"{account.username}:{{PLAIN}}{account.password}:{self._uid}:{self._gid}::"
            f"{self._home(account.username)}::nodelay=yes\n"
        )
        path = self.users_dir / account.username
        tmp = self.users_dir / f".{account.username}.tmp"
        tmp.write_text(line)
        tmp.chmod(0o644)
        os.replace(tmp, path)  # atomic: never a half-written file

    def _remove_user_file(self, username: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.users_dir / username).unlink()

    # ------------------------------------------------------------------ delivery

    def deliver(
        self,
        rcpt: str | Account,
        raw: bytes,
        folder: str | None = None,
        *,
        mail_from: str = f"sender@{DOMAIN}",
        timeout: float = 10.0,
    ) -> None:
        """Deliver ``raw`` (a full RFC 5322 message) to ``rcpt`` over LMTP.

        With ``folder`` the message goes into that folder (created if missing,
        hierarchy separator ``/``) via ``lmtp_save_to_detail_mailbox``, i.e. to
        ``local+folder@domain``. Raises ``smtplib.SMTPException`` if refused.
        """
        address = rcpt.address if isinstance(rcpt, Account) else rcpt
        if folder is not None:
            if not folder or any(ch in folder for ch in '@+ \r\n"<>'):
                raise ValueError(f"folder {folder!r} cannot be used with deliver(); use append()")
            local, domain = address.split("@", 1)
            address = f"{local}+{folder}@{domain}"
        with smtplib.LMTP(
            self.host, self.lmtp_port, local_hostname="localhost", timeout=timeout
        ) as lmtp:
            refused = lmtp.sendmail(mail_from, [address], raw)
        if refused:  # pragma: no cover - sendmail raises when every rcpt is refused
            raise smtplib.SMTPRecipientsRefused(refused)

    async def adeliver(
        self,
        rcpt: str | Account,
        raw: bytes,
        folder: str | None = None,
        *,
        mail_from: str = f"sender@{DOMAIN}",
        timeout: float = 10.0,
    ) -> None:
        """:meth:`deliver` from async code (runs it in a worker thread)."""
        await asyncio.to_thread(
            self.deliver, rcpt, raw, folder, mail_from=mail_from, timeout=timeout
        )

    # ------------------------------------------------------------------ doveadm

    def doveadm(self, *args: str, input: bytes | None = None, timeout: float = 30.0) -> str:
        """Run ``doveadm -c CONFIG ARGS...`` and return stdout; raise on failure."""
        cmd = [self._doveadm, "-c", str(self.config_path), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise DovecotError(
                f"{' '.join(cmd)} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout.decode(errors="replace")

    @staticmethod
    def _user(user: str | Account) -> str:
        return user.username if isinstance(user, Account) else user

    def kick(self, user: str | Account) -> None:
        """Disconnect all of ``user``'s IMAP sessions (``doveadm kick``).

        Not an error when the user has no session.
        """
        username = self._user(user)
        cmd = [self._doveadm, "-c", str(self.config_path), "kick", username]
        proc = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if proc.returncode not in (0, 68):  # 68 = EX_NOUSER: nobody was logged in
            raise DovecotError(
                f"doveadm kick {username} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )

    def create_folder(self, user: str | Account, name: str) -> None:
        """Create folder ``name`` (``/`` separates hierarchy levels)."""
        self.doveadm("mailbox", "create", "-u", self._user(user), name)

    def delete_folder(self, user: str | Account, name: str) -> None:
        """Delete folder ``name`` together with the messages in it."""
        self.doveadm("mailbox", "delete", "-u", self._user(user), name)

    def folders(self, user: str | Account) -> list[str]:
        """Names of all of ``user``'s folders."""
        out = self.doveadm("mailbox", "list", "-u", self._user(user))
        return [line for line in out.splitlines() if line]

    def uidvalidity(self, user: str | Account, folder: str = "INBOX") -> int:
        """The folder's current UIDVALIDITY."""
        return int(self._status(user, folder, "uidvalidity"))

    def uidnext(self, user: str | Account, folder: str = "INBOX") -> int:
        """The folder's current UIDNEXT."""
        return int(self._status(user, folder, "uidnext"))

    def _status(self, user: str | Account, folder: str, field: str) -> str:
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", self._user(user), field, folder)
        # flow format: "uidvalidity=1700000000"
        for token in out.split():
            key, _, value = token.partition("=")
            if key == field:
                return value
        raise DovecotError(f"no {field} in doveadm output: {out!r}")

    def recreate_folder(self, user: str | Account, name: str) -> int:
        """Delete and re-create folder ``name``; return its new UIDVALIDITY.

        Guarantees the UIDVALIDITY differs from before (if the folder existed), which
        is how a client must notice that its cached UIDs are void.
        """
        username = self._user(user)
        old: int | None = None
        if name in self.folders(username):
            old = self.uidvalidity(username, name)
            self.delete_folder(username, name)
        self.create_folder(username, name)
        new = self.uidvalidity(username, name)
        if old is not None and new == old:
            # Dovecot normally hands out a fresh value already; make sure of it.
            self.doveadm("mailbox", "update", "-u", username, "--uid-validity", str(old + 1), name)
            new = self.uidvalidity(username, name)
        if old is not None and new == old:
            raise DovecotError(f"UIDVALIDITY of {name!r} did not change ({new})")
        return new

    def list_uids(self, user: str | Account, folder: str = "INBOX") -> list[int]:
        """UIDs of all messages in ``folder``, ascending."""
        out = self.doveadm("search", "-u", self._user(user), "mailbox", folder, "ALL")
        # Each line: "<mailbox-guid> <uid>"
        return sorted(int(line.split()[1]) for line in out.splitlines() if line.strip())

    def flags(self, user: str | Account, folder: str, uid: int) -> set[str]:
        """Flags of message ``uid`` in ``folder``, e.g. ``{"\\\\Seen"}``.

        ``\\Recent`` is left out: it is per-session state, and doveadm itself may
        consume it. Raises :class:`DovecotError` if there is no such message.
        """
        out = self.doveadm(
            "-f", "tab", "fetch", "-u", self._user(user), "uid flags",
            "mailbox", folder, "uid", str(uid),
        )  # fmt: skip
        rows = [line.split("\t") for line in out.splitlines() if line]
        # First row is the header ("uid\tflags"), then one row per message.
        for row in rows[1:]:
            if row and row[0] == str(uid):
                return {f for f in (row[1].split() if len(row) > 1 else []) if f != "\\Recent"}
        raise DovecotError(f"no message with UID {uid} in {folder!r}")

    def fetch_raw(self, user: str | Account, folder: str, uid: int) -> bytes:
        """The message as stored (``doveadm fetch text``): LF line endings, with the
        ``Return-Path``/``Delivered-To``/``Received`` headers LMTP added."""
        cmd = [
            self._doveadm, "-c", str(self.config_path), "fetch", "-u", self._user(user),
            "text", "mailbox", folder, "uid", str(uid),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise DovecotError(f"doveadm fetch text failed: {proc.stderr.decode(errors='replace')}")
        # pager format: "text:\n<message>\n\x0c\n"
        body = proc.stdout
        prefix = b"text:\n"
        if not body.startswith(prefix):
            raise DovecotError(f"no message with UID {uid} in {folder!r}")
        body = body[len(prefix) :]
        if body.endswith(b"\x0c\n"):
            body = body[:-2]
        return body

    def append(self, user: str | Account, folder: str, raw: bytes) -> None:
        """Store ``raw`` in ``folder`` directly (``doveadm save``), bypassing LMTP.

        The folder is created first if it does not exist.
        """
        username = self._user(user)
        if folder.upper() != "INBOX" and folder not in self.folders(username):
            self.create_folder(username, folder)
        self.doveadm("save", "-u", username, "-m", folder, input=raw)

    def set_flags(self, user: str | Account, folder: str, uid: int, *flags: str) -> None:
        """Add ``flags`` (e.g. ``"\\\\Seen"``) to message ``uid``."""
        self.doveadm(
            "flags", "add", "-u", self._user(user), " ".join(flags),
            "mailbox", folder, "uid", str(uid),
        )  # fmt: skip

    def expunge(self, user: str | Account, folder: str, uid: int) -> None:
        """Expunge message ``uid`` from ``folder``."""
        self.doveadm("expunge", "-u", self._user(user), "mailbox", folder, "uid", str(uid))

    # ------------------------------------------------------------------ internals

    def _render_config(self, capability: str | None) -> str:
        r = self.root
        settings: dict[str, str] = {
            "instance_name": self.instance_name,
            "base_dir": f"{r}/run",
            "state_dir": f"{r}/state",
            "log_path": str(self.log_path),
            "info_log_path": str(self.log_path),
            "debug_log_path": str(self.log_path),
            "log_timestamp": '"%Y-%m-%d %H:%M:%S "',
            "protocols": "imap lmtp",
            "listen": self.host,
            "ssl": "yes",
            "ssl_cert": f"<{self.pki.cert_file}",
            "ssl_key": f"<{self.pki.key_file}",
            "ssl_min_protocol": "TLSv1.2",
            "auth_mechanisms": "plain login"
            + (" xoauth2 oauthbearer" if self.oauth_introspection_url else ""),
            "disable_plaintext_auth": "no",
            "auth_cache_size": "0",
            "auth_failure_delay": "0",
            "auth_verbose": "yes",
            "mail_location": "maildir:~/Maildir:LAYOUT=fs",
            "first_valid_uid": str(self._uid),
            "first_valid_gid": str(self._gid),
            # Fallback poll when inotify does not notice a change; IDLE is otherwise
            # notified through inotify straight away.
            "mailbox_idle_check_interval": "1 secs",
            "lmtp_save_to_detail_mailbox": "yes",
            "recipient_delimiter": "+",
            "lda_mailbox_autocreate": "yes",
            "lda_mailbox_autosubscribe": "yes",
            "postmaster_address": f"postmaster@{DOMAIN}",
            "login_greeting": "prx-test Dovecot ready.",
            # Every process would otherwise connect to the stats service; tests need none.
            "stats_writer_socket_path": "",
            **self._process_users,
        }
        if _DH_PARAMS.is_file():
            settings["ssl_dh"] = f"<{_DH_PARAMS}"
        if capability is not None:
            settings["imap_capability"] = capability
        body = "\n".join(f"{k} = {v}" for k, v in settings.items())
        unprivileged = bool(self._process_users)
        no_chroot = "  chroot =\n" if unprivileged else ""
        return f"""# Generated by tests/servers/dovecot.py - do not edit.
{body}

namespace inbox {{
  inbox = yes
  separator = {self.separator}
  prefix = {self.namespace_prefix}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
}}

{self._oauth_passdb()}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
{"  mechanisms = plain login" + chr(10) if self.oauth_introspection_url else ""}}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}

protocol imap {{
  # Tests reconnect a lot from one IP; the default of 10 is easy to hit.
  mail_max_userip_connections = 1000
}}

service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
    ssl = yes
  }}
  process_min_avail = 1
{no_chroot}}}

service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.lmtp_port}
  }}
}}

service anvil {{
  # No auth penalty: Dovecot would otherwise delay every login from 127.0.0.1
  # by 2-15 s after a failed one (tests fail logins on purpose).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{no_chroot}}}

{self.extra_config}
"""

    def _oauth_passdb(self) -> str:
        if not self.oauth_introspection_url:
            return ""
        ext = self.root / "dovecot-oauth2.conf.ext"
        ext.write_text(
            "introspection_mode = post\n"
            f"introspection_url = {self.oauth_introspection_url}\n"
            "force_introspection = yes\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
        )
        ext.chmod(0o644)
        return f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {ext}
}}
"""

    def _launch(self, capability: str | None) -> None:
        for port in (self.imap_port, self.imaps_port, self.lmtp_port):
            if not _port_is_bindable(self.host, port):
                raise DovecotError(
                    f"port {self.host}:{port} is in use before starting Dovecot "
                    "(a leftover instance?)"
                )
        self.config_path.write_text(self._render_config(capability))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr_path = self.root / "dovecot.stderr"
        with stderr_path.open("ab") as stderr:
            self._proc = subprocess.Popen(
                [self._dovecot, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # own process group: we can kill all of it
            )
        _LIVE.add(self)
        self._start_watchdog(self._proc.pid)
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = {self.imap_port, self.imaps_port, self.lmtp_port}
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise DovecotError(self._failure("Dovecot exited during startup"))
            for port in sorted(pending):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((self.host, port), timeout=0.5),
                ):
                    pending.discard(port)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise DovecotError(self._failure(f"ports {sorted(pending)} never opened"))
            time.sleep(0.02)
        # Ports may have been answered by a stale process: make sure ours is serving.
        self._read_imap_greeting(deadline)
        if self._proc.poll() is not None:
            raise DovecotError(self._failure("Dovecot exited right after startup"))
        with contextlib.suppress(FileNotFoundError):
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                new = log.read().decode(errors="replace")
            if "Fatal:" in new:
                raise DovecotError(self._failure("Dovecot logged a fatal error"))

    def _read_imap_greeting(self, deadline: float) -> None:
        remaining = max(deadline - time.monotonic(), 1.0)
        try:
            with socket.create_connection((self.host, self.imap_port), timeout=remaining) as sock:
                greeting = sock.recv(4096)
        except OSError as exc:
            raise DovecotError(self._failure(f"no IMAP greeting: {exc}")) from exc
        if b"prx-test Dovecot ready." not in greeting:
            raise DovecotError(self._failure(f"unexpected IMAP greeting {greeting!r}"))

    def _failure(self, what: str) -> str:
        stderr = ""
        with contextlib.suppress(OSError):
            stderr = (self.root / "dovecot.stderr").read_text(errors="replace")[-2000:]
        return (
            f"{what} (config {self.config_path}).\n--- dovecot log tail ---\n{self.log_tail()}"
            + (f"\n--- dovecot stderr ---\n{stderr}" if stderr.strip() else "")
        )

    def _discover_capability(self) -> list[str]:
        """Log in once and return the post-login CAPABILITY list of this build."""
        probe = f"capability-probe-{secrets.token_hex(3)}@{DOMAIN}"
        with self._lock:
            account = Account(username=probe, password=DEFAULT_PASSWORD, address=probe)
            self._accounts[probe] = account
            self._write_user_file(account)
        try:
            imap = imaplib.IMAP4(self.host, self.imap_port, timeout=10)
            try:
                imap.login(account.username, account.password)
                typ, data = imap.capability()
            finally:
                with contextlib.suppress(Exception):
                    imap.logout()
        finally:
            with self._lock:
                del self._accounts[probe]
                self._remove_user_file(probe)
        if typ != "OK" or not data or data[0] is None:
            raise DovecotError(f"CAPABILITY failed: {typ} {data!r}")
        caps = data[0].decode().split() if isinstance(data[0], bytes) else []
        if "IMAP4rev1" not in caps:
            raise DovecotError(f"unexpected capability list {caps}")
        return caps

    def _terminate(self, graceful: bool = True) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        pgid = proc.pid  # start_new_session: the master leads its own group
        if graceful and proc.poll() is None:
            # Like a real shutdown: each imap process says "* BYE Server shutting
            # down." on SIGTERM (the master alone takes over a second to get to
            # them). Then stop the master; it lingers for its log process, so once
            # the other services are gone the rest is simply killed below.
            self._signal_and_wait(pgid, signal.SIGTERM, lambda cmd: cmd.endswith("/imap"))
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            # Short grace period for TLS proxies in imap-login to flush the BYEs; idle
            # pre-forked login processes would otherwise take about a second to go.
            self._signal_and_wait(
                pgid,
                None,
                lambda cmd: not cmd.endswith("/log") and "-c " not in cmd,
                timeout=0.2,
            )
        # Kill everything left in the process group, so that no straggler keeps
        # our ports bound or writes to the mail directory.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        deadline = time.monotonic() + 5.0
        while live_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        ports = (self.imap_port, self.imaps_port, self.lmtp_port)
        while not all(_port_is_bindable(self.host, p) for p in ports):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        self._stop_watchdog()
        _LIVE.discard(self)

    def _start_watchdog(self, pgid: int) -> None:
        """Make sure Dovecot dies with us, however we die.

        ``atexit`` does not run when the test process is killed (a CI timeout, a
        SIGTERM/SIGKILL), and Dovecot runs in its own session, so nothing else would
        stop it. The watchdog is a tiny process in its own session that blocks on a
        pipe whose write end only we hold; when we exit for any reason the pipe
        closes and it SIGKILLs Dovecot's process group and removes its directory.
        """
        read_fd, write_fd = os.pipe()  # both non-inheritable by default
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(read_fd), str(pgid), str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(read_fd,),
                start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watchdog_fd = write_fd

    def _stop_watchdog(self) -> None:
        if self._watchdog_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._watchdog_fd, b"stopped")  # orderly: do nothing
            os.close(self._watchdog_fd)
            self._watchdog_fd = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            self._watchdog = None

    @staticmethod
    def _signal_and_wait(
        pgid: int,
        sig: signal.Signals | None,
        which: Callable[[str], bool],
        timeout: float = 1.0,
    ) -> None:
        """Send ``sig`` to the group members whose cmdline matches ``which`` and
        wait (bounded) until no matching member is left."""
        if sig is not None:
            for pid, cmd in live_group_members(pgid).items():
                if which(cmd):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(which(cmd) for cmd in live_group_members(pgid).values()):
                return
            time.sleep(0.01)


_WATCHDOG = """
import os, shutil, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
fd, pgid, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
said = b""
while chunk := os.read(fd, 4096):
    said += chunk
if said:  # an orderly stop: the parent said so before closing the pipe
    sys.exit(0)
try:
    os.killpg(pgid, signal.SIGKILL)
except OSError:
    pass
if not os.environ.get("PRX_KEEP_DOVECOT"):
    shutil.rmtree(root, ignore_errors=True)
"""


def live_group_members(pgid: int) -> dict[int, str]:
    """``{pid: cmdline}`` of the non-zombie processes in process group ``pgid``."""
    members: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Fields after the parenthesised command: state ppid pgrp ...
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # the process went away meanwhile
        members[int(entry.name)] = cmdline.strip()
    return members


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: never leave a Dovecot running after the test process exits."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()
