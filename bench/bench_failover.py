"""Failover as a user sees it: kill a replica, and time until a mail to one of its
mailboxes is answered by another.

Run by hand: ``python bench/bench_failover.py [--kills 10] [--lease 5]``. It starts
Dovecot, an SMTP server and a throwaway PostgreSQL on loopback (the test fixtures),
and three ``prx-email run echo`` replicas over twelve mailboxes. Each round SIGKILLs
one replica, at once delivers a mail to a mailbox it served, and measures the time
from the kill to the reply at the SMTP server; the killed replica is then restarted
and the next round waits for the replicas to share the mailboxes again. The baseline,
measured in the same run, is a mail to a mailbox whose replica stays alive.
The contract's bound is lease_secs + 15 s.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import tempfile
import time
from email.utils import make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers.certs import make_pki
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer
from tests.servers.smtp import SmtpServer
from tests.test_replica_campaign import FOLDERS, Replica, twelve_mailboxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--lease", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prx-failover-") as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki")
        dovecot = DovecotServer(idle=True, pki=pki)
        dovecot.start()
        smtp = SmtpServer(pki)
        smtp.start()
        pg = PostgresServer().start()
        replicas: list[Replica] = []
        try:
            users, config = twelve_mailboxes(
                tmp, dovecot, smtp, pg.url(pg.new_database()), args.lease
            )
            every = {(f"box{i}", f) for i in range(len(users)) for f in FOLDERS}
            share = math.ceil(len(every) / 3) + 1
            replicas = [Replica(f"r{i}", config, tmp) for i in range(3)]
            for r in replicas:
                r.start()

            def balanced() -> bool:
                served = [r.serving() for r in replicas]
                flat = [m for s in served for m in s]
                return sorted(flat) == sorted(every) and all(0 < len(s) <= share for s in served)

            def wait(check: object, within: float) -> None:
                start = time.monotonic()
                while not check():  # type: ignore[operator]
                    if time.monotonic() - start > within:
                        raise TimeoutError("not reached")
                    time.sleep(0.05)

            def reply_time(box: tuple[str, str]) -> float:
                """Deliver a mail to ``box`` now; seconds until its reply arrives."""
                user = users[int(box[0].removeprefix("box"))]
                mid = make_msgid(domain="example.test")
                raw = (f"From: alice@example.test\r\nTo: {user.address}\r\nSubject: ping\r\n"
                       f"Message-ID: {mid}\r\n\r\nping\r\n").encode()  # fmt: skip
                start = time.monotonic()
                dovecot.deliver(user, raw, folder=box[1])

                def answered() -> bool:
                    return any((m.message().get("In-Reply-To") or "").strip() == mid
                               for m in smtp.messages)  # fmt: skip

                wait(answered, args.lease + 120)
                return time.monotonic() - start

            baseline: list[float] = []
            failover: list[float] = []
            for n in range(args.kills):
                wait(balanced, 4 * args.lease + 60)
                victim = replicas[n % 3]
                other = replicas[(n + 1) % 3]
                baseline.append(reply_time(sorted(other.serving())[0]))
                box = sorted(victim.serving())[0]
                killed = time.monotonic()
                victim.signal(signal.SIGKILL)
                victim.proc.wait(10)  # type: ignore[union-attr]
                reply_time(box)  # returns once the reply arrived
                failover.append(time.monotonic() - killed)  # measured from the kill
                victim.start()
                print(f"  kill {n + 1}: reply after {failover[-1]:.2f} s", flush=True)
            print(f"lease_secs={args.lease:g}, {args.kills} kills, 3 replicas, 12 mailboxes")
            print(f"baseline (mail to a live replica's mailbox): median"
                  f" {statistics.median(baseline):.2f} s, max {max(baseline):.2f} s")  # fmt: skip
            print(f"failover (kill to the reply on a moved mailbox): median"
                  f" {statistics.median(failover):.2f} s, max {max(failover):.2f} s"
                  f" (bound {args.lease + 15:g} s)")  # fmt: skip
        finally:
            for r in replicas:
                r.stop()
            pg.stop()
            smtp.stop()
            dovecot.close()


if __name__ == "__main__":
    main()
