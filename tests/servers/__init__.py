"""Real servers for the test suite: Dovecot (IMAP/LMTP), an SMTP sink, a TCP proxy.

See ``tests/conftest.py`` for the pytest fixtures built on these.
"""

from .certs import TestPKI, make_pki, make_unrelated_ca
from .dovecot import Account, DovecotError, DovecotServer
from .proxy import TcpProxy
from .smtp import AuthAttempt, ReceivedMessage, SmtpServer

__all__ = [
    "Account",
    "AuthAttempt",
    "DovecotError",
    "DovecotServer",
    "ReceivedMessage",
    "SmtpServer",
    "TcpProxy",
    "TestPKI",
    "make_pki",
    "make_unrelated_ca",
]
