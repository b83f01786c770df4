"""Host names: which ones never leave this machine.

Here, below config, OAuth and the doctor, because all three ask the same question.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for hosts that never leave this machine (plaintext is allowed there).

    Only ``localhost`` and loopback IP literals: a name like ``x.localhost`` may be
    sent to a DNS server (nsswitch "files dns"), and then anywhere.
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plaintext_allowed(host: str, allow_insecure: bool) -> bool:
    """Plaintext may carry the password only on this machine, or by explicit opt-in."""
    return is_loopback(host) or allow_insecure
