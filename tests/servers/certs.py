"""A throw-away test PKI: one CA and one leaf certificate for loopback servers.

The leaf certificate is valid for ``localhost`` and ``127.0.0.1`` so clients can
verify it whichever of the two names they connect to. Everything is written to
PEM files because Dovecot only reads certificates from files, and because the
code under test is expected to take a ``ca_file`` path.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

#: Names the leaf certificate is valid for.
SERVER_IDENTITIES: tuple[str, ...] = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TestPKI:
    """Paths of a CA and a server certificate signed by it (all PEM)."""

    __test__ = False  # not a pytest test class despite the name

    ca_file: Path
    """The CA certificate: what clients must trust (pass it as ``ca_file``)."""
    cert_file: Path
    """The server certificate chain (leaf first)."""
    key_file: Path
    """The server's private key."""

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the leaf certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path, identities: tuple[str, ...] = SERVER_IDENTITIES) -> TestPKI:
    """Create a new CA and a server certificate for ``identities`` in ``directory``."""
    import trustme  # test dependency; imported lazily so a prebuilt PKI needs none

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="prx-channel-email test CA")
    leaf = ca.issue_cert(*identities, common_name=identities[0])
    ca_file = directory / "ca.pem"
    cert_file = directory / "server-cert.pem"
    key_file = directory / "server-key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # Leaf first, then any intermediates (none for a trustme root, but be generic).
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    ca_file.chmod(0o644)
    cert_file.chmod(0o644)
    # Dovecot reads the key as root (or as the current user when not root).
    key_file.chmod(0o600)
    return TestPKI(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def make_unrelated_ca(directory: Path) -> Path:
    """Write the certificate of a fresh CA that signed nothing; for negative tests."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "unrelated-ca.pem"
    trustme.CA(organization_name="prx-channel-email unrelated CA").cert_pem.write_to_path(str(path))
    return path
