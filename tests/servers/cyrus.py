"""A real Cyrus IMAP 3.6 for tests, unpacked into a private prefix (never installed).

Debian's ``cyrus-imapd`` conflicts with ``dovecot-imapd``, so ``tests/run.sh``
fetches the packages with ``apt-get download`` and unpacks them with ``dpkg -x``
into :data:`CYRUS_ROOT` (``$PRX_TEST_CYRUS_ROOT``, else
``/opt/prx-test-cyrus/root``). Nothing outside that prefix and the server's
own temp directory is touched.

Each :class:`CyrusServer` runs ``master`` with its own ``imapd.conf`` /
``cyrus.conf`` on free loopback ports: IMAP (plaintext, loopback only: the
channel allows that), LMTP for delivery, and ``idled`` (the daemon Debian ships
commented out; without it IDLE is announced only every ~60 s). Logins are
checked against a private sasldb. Folders follow Cyrus's default Debian
namespace: ``INBOX/...`` with ``/`` as the delimiter.
"""

from __future__ import annotations

import atexit
import contextlib
import imaplib
import os
import pwd
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .dovecot import Account, free_ports

# Readable by every user: Cyrus's processes run as an unprivileged one.
CYRUS_ROOT = Path(os.environ.get("PRX_TEST_CYRUS_ROOT") or "/opt/prx-test-cyrus/root")
ADMIN = "admin"


class CyrusError(RuntimeError):
    """Cyrus is not unpacked, or did not start."""


class CyrusServer:
    """See the module docstring. Use as a context manager or start()/close()."""

    def __init__(self, *, idled: bool = True, root: Path = CYRUS_ROOT) -> None:
        self.root = root
        self.bin = root / "usr" / "lib" / "cyrus" / "bin"
        if not (self.bin / "master").is_file():
            raise CyrusError(
                f"Cyrus is not unpacked under {root}: run tests/run.sh (it fetches "
                "cyrus-imapd with apt-get download and unpacks it with dpkg -x)"
            )
        self.idled = idled
        self.host = "127.0.0.1"
        self.imap_port, self.lmtp_port = free_ports(2, self.host)
        self.dir = Path(tempfile.mkdtemp(prefix="prxcy-", dir="/tmp"))
        self.admin_password = secrets.token_urlsafe(12)
        self._proc: subprocess.Popen[bytes] | None = None
        # Cyrus refuses to run as root: it becomes this user (the owner of its files).
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._env = dict(os.environ)
        libs = [str(root / "usr/lib/x86_64-linux-gnu"), str(root / "lib/x86_64-linux-gnu")]
        self._env["LD_LIBRARY_PATH"] = ":".join(libs)

    def __enter__(self) -> CyrusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 20.0) -> None:
        d = self.dir
        for sub in ("config", "spool", "run"):
            (d / sub).mkdir(exist_ok=True)
        conf = d / "imapd.conf"
        conf.write_text(
            f"configdirectory: {d}/config\n"
            "defaultpartition: default\n"
            f"partition-default: {d}/spool\n"
            "sasl_pwcheck_method: auxprop\n"
            "sasl_auxprop_plugin: sasldb\n"
            f"sasl_sasldb_path: {d}/sasldb2\n"
            "sasl_mech_list: PLAIN LOGIN\n"
            f"admins: {ADMIN}\n"
            "allowplaintext: yes\n"
            "altnamespace: no\n"
            "unixhierarchysep: yes\n"
            "servername: localhost\n"
            f"cyrus_user: {self.user}\n"
            f"idlesocket: {d}/run/idle\n"
            f"notifysocket: {d}/run/notify\n"
            f"lmtpsocket: {d}/run/lmtp\n"
            "syslog_prefix: prx-test-cyrus\n"
        )
        c, h = f"-C {conf}", self.host
        daemon = f'  idled cmd="{self.bin}/idled {c}"\n' if self.idled else ""
        (d / "cyrus.conf").write_text(
            f'START {{\n  recover cmd="{self.bin}/ctl_cyrusdb {c} -r"\n}}\n'
            "SERVICES {\n"
            f'  imap cmd="{self.bin}/imapd {c}" listen="{h}:{self.imap_port}" prefork=0\n'
            f'  lmtp cmd="{self.bin}/lmtpd {c} -a" listen="{h}:{self.lmtp_port}" prefork=0\n'
            "}\nEVENTS {\n}\n"
            f"DAEMON {{\n{daemon}}}\n"
        )
        self._saslpasswd(ADMIN, self.admin_password)
        subprocess.run(["chown", "-R", self.user, str(d)], check=True)
        self._proc = subprocess.Popen(
            [str(self.bin / "master"), "-C", str(conf), "-M", str(d / "cyrus.conf"),
             "-D", "-p", str(d / "run" / "master.pid")],
            env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        atexit.register(self.close)  # a test run that ends early leaves no Cyrus behind
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.imap_port), timeout=1) as sock,
            ):
                if sock.recv(200).startswith(b"* OK"):
                    return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise CyrusError("Cyrus master did not start (it logs to syslog only)")
            time.sleep(0.1)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def version(self) -> str:
        with socket.create_connection((self.host, self.imap_port), timeout=5) as sock:
            return sock.recv(300).decode(errors="replace").split("] ", 1)[-1].strip()

    # ------------------------------------------------------------------ users and mail

    def _saslpasswd(self, user: str, password: str) -> None:
        subprocess.run(
            [str(self.root / "usr/sbin/saslpasswd2"), "-p", "-c", "-f",
             str(self.dir / "sasldb2"), "-u", "localhost", user],
            input=password.encode(), env=self._env, check=True, timeout=30,
        )  # fmt: skip

    def _admin(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4(self.host, self.imap_port, timeout=10)
        imap.login(ADMIN, self.admin_password)
        return imap

    def add_user(self, name: str | None = None) -> Account:
        name = name or f"u{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        self._saslpasswd(name, password)
        subprocess.run(["chown", self.user, str(self.dir / "sasldb2")], check=True)
        with self._admin() as imap:
            typ, data = imap.create(f"user/{name}")
            if typ != "OK":
                raise CyrusError(f"CREATE user/{name}: {data}")
        return Account(username=name, password=password, address=f"{name}@localhost")

    def create_folder(self, account: Account, name: str) -> None:
        """``name`` as the user sees it (``INBOX/Processed``)."""
        with self._user(account) as imap:
            typ, data = imap.create(name)
            if typ != "OK":
                raise CyrusError(f"CREATE {name}: {data}")

    def _user(self, account: Account) -> imaplib.IMAP4:
        imap = imaplib.IMAP4(self.host, self.imap_port, timeout=10)
        imap.login(account.username, account.password)
        return imap

    def list_uids(self, account: Account, folder: str = "INBOX") -> list[int]:
        with self._user(account) as imap:
            imap.select(folder, readonly=True)
            typ, data = imap.uid("SEARCH", "ALL")
            return [int(u) for u in (data[0] or b"").split()] if typ == "OK" else []

    def deliver(self, account: Account, raw: bytes, *, mail_from: str) -> None:
        with smtplib.LMTP(self.host, self.lmtp_port, local_hostname="localhost") as lmtp:
            lmtp.sendmail(mail_from, [account.username], raw)
