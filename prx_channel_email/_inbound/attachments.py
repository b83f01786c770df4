"""Attachments: safe names, size and type limits, and saving inside one directory only.

A filename in mail is attacker-controlled text. It is reduced to one harmless
path component before it gets anywhere near the file system, and every write is
checked to land inside the configured directory (symlinks included).
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prx_channel_email._mail.mime_body import RawAttachment
from prx_channel_email.config import EmailConfig
from prx_channel_email.config.slices import ConfigSlice
from prx_channel_email.models import Attachment

TOO_LARGE = "too_large"
TYPE_NOT_ALLOWED = "type_not_allowed"
MESSAGE_LIMIT = "message_total_too_large"
SAVE_FAILED = "save_failed"

# A file name's length in UTF-8 bytes (what file systems limit: 255 on most), with
# room left for the " (2)" of a repeated name and the ".part" of the temporary file;
# and, for readability, in characters.
MAX_NAME_BYTES = 200
MAX_NAME_CHARS = 120
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", "clock$", "conin$", "conout$"}
    | {f"com{i}" for i in range(10)}
    | {f"lpt{i}" for i in range(10)}
)
_BAD_CHARS_RE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')


def safe_filename(name: str | None, index: int, content_type: str) -> str:
    """One path component that is safe on POSIX and Windows and keeps the extension.

    No directory parts, no ``..``, no leading dot, no control or bidi-override
    characters, no device names (CON, NUL, COM1 ...), bounded length.
    """
    text = unicodedata.normalize("NFC", name or "")
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    text = _BAD_CHARS_RE.sub("_", text).strip().strip(". ")
    while ".." in text:
        text = text.replace("..", ".")
    stem, dot, ext = text.rpartition(".")
    if not dot:
        stem, ext = text, ""
    if len(ext) > 16 or not ext.strip():
        stem, ext = text, ""
    if not stem:
        stem = f"attachment-{index}"
        if not ext:
            guessed = mimetypes.guess_extension(content_type or "") or ""
            ext = guessed.lstrip(".")
    if stem.split(".")[0].strip().lower() in _RESERVED:
        stem = "_" + stem
    room = MAX_NAME_BYTES - (len(ext.encode()) + 1 if ext else 0)
    stem = _cut_bytes(stem[: MAX_NAME_CHARS - len(ext) - 1], room)
    stem = stem.rstrip(". ") or f"attachment-{index}"
    return f"{stem}.{ext}" if ext else stem


def _cut_bytes(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 form fits in ``limit`` bytes
    (never half a character)."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def type_allowed(content_type: str, allowed: Iterable[str]) -> bool:
    """``attachment_types`` semantics: exact types, ``type/*``, or ``*`` / ``*/*`` for all."""
    ctype = content_type.strip().lower()
    major = ctype.partition("/")[0]
    for entry in allowed:
        item = entry.strip().lower()
        if item in ("*", "*/*") or item == ctype or item == f"{major}/*":
            return True
    return False


def message_key(raw: bytes) -> str:
    """What names a message's attachment directory: a hash of its raw bytes.

    The same bytes processed again get the same directory (their files are
    overwritten, not duplicated). A different message gets a different one even
    when it claims the same Message-ID, so it can never replace the files of the
    message that really owns that id.
    """
    return hashlib.sha256(raw).hexdigest()


def message_dir(base: Path, key: str) -> Path:
    """The per-message directory for ``key`` (see :func:`message_key`)."""
    return base / hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:32]


@dataclass(frozen=True)
class Planned:
    """An attachment's metadata, and its bytes when it passed the limits."""

    meta: Attachment
    data: bytes | None


@dataclass(frozen=True)
class AttachmentLimits(ConfigSlice):
    """What attachment planning reads of the config (the names are EmailConfig's)."""

    max_attachment_bytes: int
    max_attachments_total_bytes: int
    attachment_types: tuple[str, ...]


def plan(found: list[RawAttachment], limits: EmailConfig | AttachmentLimits) -> list[Planned]:
    """Apply the per-attachment and per-message caps and the type allow-list."""
    config = AttachmentLimits.of(limits)
    out: list[Planned] = []
    used: set[str] = set()
    total = 0
    for index, item in enumerate(found, start=1):
        name = _unique(safe_filename(item.filename, index, item.content_type), used)
        size = len(item.data)
        guessed = mimetypes.guess_type(name, strict=False)[0]
        reason: str | None = None
        if size > config.max_attachment_bytes:
            reason = TOO_LARGE
        elif not type_allowed(item.content_type, config.attachment_types) or (
            guessed is not None and not type_allowed(guessed, config.attachment_types)
        ):
            reason = TYPE_NOT_ALLOWED
        elif total + size > config.max_attachments_total_bytes:
            reason = MESSAGE_LIMIT
        else:
            total += size
        meta = Attachment(
            filename=name, content_type=item.content_type, size=size, skipped_reason=reason
        )
        out.append(Planned(meta, item.data if reason is None else None))
    return out


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        stem, dot, ext = name.rpartition(".")
        candidate = f"{stem} ({n}).{ext}" if dot else f"{name} ({n})"
    used.add(candidate.lower())
    return candidate


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def save(base: Path, key: str, planned: list[Planned]) -> list[Attachment]:
    """Write the accepted attachments (blocking: call it on a thread).

    ``key`` is the message's :func:`message_key` (a hash of its raw bytes, never
    its Message-ID): files go to ``message_dir(base, key)``.

    Writes go to a temporary name and are renamed into place, so a crash leaves
    either the old file or the new one. Nothing is written unless the resolved
    target is inside ``base``. No fsync: a killed process loses nothing already
    written, and after a power cut the message itself (on the framework's queue,
    in memory) is gone too, so syncing each file would buy nothing for its cost.
    """
    if not any(p.data is not None for p in planned):
        return [p.meta for p in planned]
    results: list[Attachment] = []
    try:
        if not base.is_dir():
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(base, 0o700)  # whatever the umask
        root = base.resolve()
        target_dir = message_dir(root, key)
        if target_dir.is_symlink():
            target_dir.unlink()
        target_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target_dir, 0o700)
        dir_ok = _inside(target_dir, root)
    except OSError:
        root = target_dir = base
        dir_ok = False
    for item in planned:
        if item.data is None:
            results.append(item.meta)
            continue
        target = target_dir / item.meta.filename
        if not dir_ok or target.parent != target_dir or not _inside(target.parent, root):
            results.append(item.meta.model_copy(update={"skipped_reason": SAVE_FAILED}))
            continue
        try:
            _write(target, item.data)
        except OSError:
            results.append(item.meta.model_copy(update={"skipped_reason": SAVE_FAILED}))
            continue
        results.append(item.meta.model_copy(update={"path": target}))
    return results


def _write(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    if tmp.is_symlink():
        tmp.unlink()
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits off (or the file existed)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if target.is_symlink():
        target.unlink()
    os.replace(tmp, target)
