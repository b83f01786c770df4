"""Small real filesystems for the storage-fault tests: a tmpfs to fill, or a read-only one."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (which must exist). Needs root, as CI runs;
    elsewhere the test is skipped with the reason."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem has no byte left; returns it
    (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def ext4(path: Path, image: Path, *, size_mb: int = 16) -> Iterator[Callable[[], None]]:
    """Mount a small ext4 (a loop device, ``errors=remount-ro``) on ``path``; yields a
    function that raises a filesystem error in it, after which the kernel turns it
    read-only mid-run as after a real I/O error. Root only, like :func:`tmpfs`."""
    if os.geteuid() != 0:
        pytest.skip("mounting an ext4 image needs root (CI runs the suite as root)")
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image here: {made.stderr.decode().strip()}")
    done = subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount an ext4 image here: {done.stderr.strip()}")
    device = Path(os.path.realpath(_mount_source(path))).name

    def fail() -> None:
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("test: I/O error\n")

    try:
        path.chmod(0o700)
        yield fail
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _mount_source(path: Path) -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[0]
    raise AssertionError(f"{path} is not mounted")
