"""Filesystem helpers for state kept on a local disk (the SQLite backend, the doctor).

Not SQL, and not backend specific: where a backend keeps files, they are private
(0700 directories, 0600 files) whatever the umask, and the doctor warns early when
the disk runs low.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Below this much free space where the state lives, the doctor warns (and the channel
# logs at start): the next backlog or reply may not fit, and writes would pause.
LOW_SPACE_BYTES = 64 * 1024 * 1024


def low_space(path: Path, threshold: int = LOW_SPACE_BYTES) -> str | None:
    """A warning when the filesystem holding ``path`` has less than ``threshold`` free."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stats = os.statvfs(probe)
    except OSError:
        return None  # unreadable: the writability check says why
    free = stats.f_bavail * stats.f_frsize
    if free >= threshold:
        return None
    return f"only {free // 1024} KiB free under {path} (warning below {threshold // 1024} KiB)"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it owner-only (0700), whatever the umask."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        # A directory we may write but do not own: its owner decides.
        with contextlib.suppress(PermissionError):
            path.chmod(0o700)


def private_file(path: Path) -> None:
    """Create ``path`` if missing, owner read/write only (0600), whatever the umask."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
