"""A throwaway PostgreSQL cluster (and optionally PgBouncer) for tests, on loopback.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from Debian's ``postgresql``
package into a temp directory, as an unprivileged user (PostgreSQL refuses to run as
root: under root the cluster belongs to the ``postgres`` system user). It listens on a
free 127.0.0.1 port, with password (SCRAM) authentication, so a ``state_url`` carries a
real secret that the masking tests can look for. Each test gets a database of its own
(:meth:`PostgresServer.new_database`).

:class:`PgBouncer` puts a transaction-pooling PgBouncer in front of a cluster: a
session there is not a server session, so session state (advisory locks, prepared
statements, SET) does not survive between transactions. Replicas must work through it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .dovecot import free_ports

USER = "prx"
PASSWORD = "pg-s3cret-" + secrets.token_hex(4)


class PostgresError(RuntimeError):
    """PostgreSQL (or PgBouncer) could not be found or started."""


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found and "/usr/lib/postgresql/" in os.path.realpath(found):
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).is_file():
            return str(base / name)
    raise PostgresError(
        f"{name!r} not found: the shared-state tests need PostgreSQL's server binaries"
        " (Debian package 'postgresql'; tests/run.sh installs it)"
    )


def _runner() -> tuple[list[str], int | None, int | None]:
    """How to run the server: as ``postgres`` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresError("running as root and there is no 'postgres' user") from exc
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


class PostgresServer:
    """One cluster in a temp directory; ``url(db)`` gives a ``postgresql://`` URL."""

    def __init__(self) -> None:
        self.prefix, self.uid, self.gid = _runner()
        self.dir = Path(tempfile.mkdtemp(prefix="prx-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log = self.dir / "server.log"
        (self.port,) = free_ports(1)
        self.host = "127.0.0.1"
        self._names = itertools.count(1)
        self._running = False

    def _own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, *args], check=True, capture_output=True,
                              text=True, timeout=120, **kw)  # type: ignore[call-overload]  # fmt: skip

    def start(self) -> PostgresServer:
        self._own(self.dir)
        self.socket_dir.mkdir()
        self._own(self.socket_dir)
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        try:
            self._run([_pg_bin("initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--no-sync"])  # fmt: skip
            options = (
                f"-c port={self.port} -c listen_addresses={self.host}"
                f" -c unix_socket_directories={self.socket_dir}"
                " -c fsync=off -c full_page_writes=off -c max_connections=300"
                " -c shared_buffers=32MB"
            )
            self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                       "-t", "60", "-o", options, "start"])  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = self.log.read_text() if self.log.exists() else ""
            raise PostgresError(f"PostgreSQL did not start: {exc.stderr}\n{log}") from exc
        self._running = True
        return self

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL over the local socket as the cluster owner; returns the output."""
        args = ["-h", str(self.socket_dir), "-p", str(self.port), "-U", USER, "-d", db]
        out = self._run([_pg_bin("psql"), *args, "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
        return out.stdout

    def new_database(self) -> str:
        """A fresh, empty database; returns its name."""
        name = f"t{next(self._names)}_{secrets.token_hex(3)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def url(self, db: str, *, host: str | None = None, port: int | None = None) -> str:
        return f"postgresql://{USER}:{PASSWORD}@{host or self.host}:{port or self.port}/{db}"

    def restart(self) -> None:
        """Stop and start the server (the database-restart row of the guarantee)."""
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "restart",
                   "-l", str(self.log)])  # fmt: skip

    def stop(self) -> None:
        if self._running:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "immediate",
                           "stop"])  # fmt: skip
            self._running = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PgBouncer:
    """PgBouncer in transaction pooling mode in front of ``server``."""

    def __init__(self, server: PostgresServer, *, pool_size: int = 10) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).is_file():
            raise PostgresError("pgbouncer not found (Debian package 'pgbouncer')")
        self.binary = binary
        self.server = server
        self.dir = Path(tempfile.mkdtemp(prefix="prx-pgb-"))
        (self.port,) = free_ports(1)
        self.pool_size = pool_size
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: str) -> str:
        return self.server.url(db, port=self.port)

    def start(self) -> PgBouncer:
        (self.dir / "users.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.server.host} port={self.server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\nmax_client_conn = 1000\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
        )
        self.server._own(self.dir)
        for f in self.dir.iterdir():
            self.server._own(f)
        self.proc = subprocess.Popen(
            [*self.server.prefix, self.binary, str(self.dir / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostgresError(f"pgbouncer exited: {self._log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise PostgresError(f"pgbouncer did not listen: {self._log()}")

    def _log(self) -> str:
        log = self.dir / "pgbouncer.log"
        return log.read_text() if log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
