"""The one builder of test configurations.

Every test config is made here, so a changed default (``sender_auth`` became
"enforce") is answered in one place, and each test states what it needs on top.
The helpers the test modules import (``inbound_config``, ``smtp_config``,
``dovecot_config``, ``imap_config``, ``make_table`` ...) are thin wrappers that
name the fixture servers and the test's own values.

Policy settings are explicit: fixture mail carries no Authentication-Results,
so tests that are not about sender authenticity run with ``sender_auth =
"flag"`` (verification is computed, nothing is refused for it). Tests about
authenticity set ``sender_auth`` and ``trusted_authserv_ids`` themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prx_channel_email.config import EmailConfig

if TYPE_CHECKING:
    from tests.servers.dovecot import Account, DovecotServer
    from tests.servers.smtp import SmtpServer

LOOPBACK = "127.0.0.1"

# What every test config says about sender authenticity unless it overrides it. Many
# tests send dozens of mails from one sender: rate limits (deferring) are not under
# test there; tests/test_ratelimit*.py set their own, or the defaults explicitly.
POLICY_DEFAULTS: dict[str, Any] = {"sender_auth": "flag", "rate_limit_count": 1_000_000}
# Most tests were written for "handled once on the queue"; the acknowledged hand-off
# (the default) has its own tests (test_handoff.py), which set handoff="ack".
HANDOFF_DEFAULTS: dict[str, Any] = {"handoff": "queue"}


def config_table(
    state_dir: Path | str,
    *,
    dovecot: DovecotServer | None = None,
    account: Account | None = None,
    smtp: SmtpServer | None = None,
    smtp_listener: Literal["tls", "starttls"] = "tls",
    host: str = LOOPBACK,
    **overrides: Any,
) -> dict[str, Any]:
    """The fields of a test config: endpoints of the given fixtures, then ``overrides``.

    ``dovecot``/``account``: the IMAP side logs in to that fixture user (over
    IMAPS). ``smtp``: the SMTP side is the fixture SMTP server's ``smtp_listener``;
    its login is the account's own unless an account is given, in which case it
    is sent as ``smtp_username``/``smtp_password``. Sides not given point at
    ``host`` and are never contacted by the test.
    """
    table: dict[str, Any] = {
        "imap_host": host,
        "smtp_host": host,
        **POLICY_DEFAULTS,
        **HANDOFF_DEFAULTS,
    }
    if dovecot is not None:
        table.update(imap_port=dovecot.imaps_port, ca_file=dovecot.ca_file)
    if account is not None:
        table.update(username=account.username, password=account.password)
    if smtp is not None:
        port = smtp.tls_port if smtp_listener == "tls" else smtp.starttls_port
        table.update(smtp_port=port, smtp_security=smtp_listener, ca_file=smtp.ca_file)
        if account is None:
            table.update(username=smtp.username, password=smtp.password)
        else:
            table.update(smtp_username=smtp.username, smtp_password=smtp.password)
    table["state_dir"] = state_dir
    table.update(overrides)
    return table


def build_config(state_dir: Path | str, **kw: Any) -> EmailConfig:
    """:func:`config_table`, validated into an :class:`EmailConfig`."""
    return EmailConfig(**config_table(state_dir, **kw))
