"""Attachments: safe names, limits, and no write outside the attachment directory."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from prx_channel_email._inbound.attachments import (
    message_dir,
    message_key,
    plan,
    safe_filename,
    save,
    type_allowed,
)
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._mail.mime_body import RawAttachment
from tests.inbound_helpers import ARRIVAL, corpus_raw, inbound_config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("C:\\Users\\x\\evil.txt", "evil.txt"),
        ("..", "attachment-3.pdf"),
        ("", "attachment-3.pdf"),
        (None, "attachment-3.pdf"),
        (".bashrc", "bashrc"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("com1.tar.gz", "_com1.tar.gz"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("a\x00b\r\nc.txt", "abc.txt"),
        ('what?<>|:"*.txt', "what_______.txt"),
        ("x" * 400 + ".txt", "x" * 116 + ".txt"),
        ("file.", "file"),
        ("a..b.txt", "a.b.txt"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert safe_filename(name, 3, "application/pdf") == expected


def test_type_allow_list_forms() -> None:
    assert type_allowed("image/png", ["image/png"])
    assert type_allowed("IMAGE/PNG", ["image/*"])
    assert type_allowed("application/x-msdownload", ["*"])
    assert not type_allowed("application/x-msdownload", ["application/pdf", "image/*"])


def test_limits_and_duplicate_names(tmp_path: Path) -> None:
    config = inbound_config(tmp_path, max_attachment_bytes=100, max_attachments_total_bytes=150)
    planned = plan(
        [
            RawAttachment("a.txt", "text/plain", b"x" * 80),
            RawAttachment("a.txt", "text/plain", b"y" * 60),  # would pass the total: 140 > 150? no
            RawAttachment("b.txt", "text/plain", b"z" * 50),  # 190 > 150: over the message cap
            RawAttachment("c.txt", "text/plain", b"z" * 101),  # over the per-attachment cap
            RawAttachment("evil.pdf.exe", "application/pdf", b"MZ"),  # extension says exe
            RawAttachment("page.html", "text/html", b"<p>"),  # type not in the list
        ],
        config,
    )
    got = [(p.meta.filename, p.meta.skipped_reason) for p in planned]
    assert got == [
        ("a.txt", None),
        ("a (2).txt", None),
        ("b.txt", "message_total_too_large"),
        ("c.txt", "too_large"),
        ("evil.pdf.exe", "type_not_allowed"),
        ("page.html", "type_not_allowed"),
    ]
    assert [p.meta.size for p in planned] == [80, 60, 50, 101, 2, 3]


async def test_hostile_names_are_saved_inside_the_directory_only(tmp_path: Path) -> None:
    config = inbound_config(tmp_path)
    pipeline = InboundPipeline(config)
    outcome = await pipeline.process(corpus_raw("hostile_attachments"), arrival=ARRIVAL)
    assert outcome.message is not None
    root = config.attachments_path.resolve()
    saved = [a for a in outcome.message.attachments if a.path is not None]
    assert len(saved) == 4
    for att in saved:
        assert att.path is not None
        key = message_key(corpus_raw("hostile_attachments"))
        assert att.path.resolve().parent == message_dir(root, key)
        assert att.path.read_bytes()  # really written
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.parts[0] == "attachments" for p in written)
    assert {p.name for p in written} == {"passwd", "abs.pdf", "_CON.txt", "attachment-7.txt"}
    skipped = {a.filename: a.skipped_reason for a in outcome.message.attachments if a.path is None}
    assert skipped == {
        "invoicefdp.exe": "type_not_allowed",
        "setup.exe": "type_not_allowed",
        "big.csv": "too_large",
    }


async def test_reprocessing_overwrites_instead_of_duplicating(tmp_path: Path) -> None:
    config = inbound_config(tmp_path)
    raw = corpus_raw("hostile_attachments")
    first = await InboundPipeline(config).process(raw, arrival=ARRIVAL)
    second = await InboundPipeline(config).process(raw, arrival=ARRIVAL)
    assert first.message is not None and second.message is not None
    assert [a.path for a in first.message.attachments] == [
        a.path for a in second.message.attachments
    ]
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 4


def test_symlink_planted_in_the_directory_is_not_followed(tmp_path: Path) -> None:
    base = tmp_path / "attachments"
    outside = tmp_path / "outside"
    outside.mkdir()
    base.mkdir()
    config = inbound_config(tmp_path)
    planned = plan([RawAttachment("note.txt", "text/plain", b"data")], config)
    # An attacker with access to the directory links the message dir, or the file, elsewhere.
    target_dir = message_dir(base.resolve(), "<m@x>")
    os.symlink(outside, target_dir)
    result = save(base, "<m@x>", planned)
    assert result[0].path is not None and result[0].path.read_bytes() == b"data"
    assert list(outside.iterdir()) == []
    victim = outside / "victim.txt"
    victim.write_bytes(b"keep")
    (target_dir / "note.txt").unlink()
    os.symlink(victim, target_dir / "note.txt")
    save(base, "<m@x>", planned)
    assert victim.read_bytes() == b"keep"
    assert not (target_dir / "note.txt").is_symlink()


def test_unwritable_directory_marks_save_failed_and_keeps_metadata(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    config = inbound_config(tmp_path)
    planned = plan([RawAttachment("a.txt", "text/plain", b"data")], config)
    result = save(blocker / "sub", "<m@x>", planned)  # the base cannot be created
    assert result[0].path is None and result[0].skipped_reason == "save_failed"
    base = tmp_path / "ok"
    base.mkdir()
    (message_dir(base.resolve(), "<m@x>")).write_text("a file where the dir should be")
    result = save(base, "<m@x>", planned)
    assert result[0].path is None and result[0].skipped_reason == "save_failed"
    assert result[0].filename == "a.txt" and result[0].size == 4


def _invoice(sender: str, message_id: str, payload: bytes) -> bytes:
    return (
        f"From: {sender}\r\nTo: bot@example.net\r\nSubject: invoice\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        "--B\r\nContent-Type: text/plain\r\n\r\nPlease pay the attached invoice.\r\n"
        "--B\r\nContent-Type: text/plain\r\n"
        "Content-Disposition: attachment; filename=invoice.txt\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{base64.b64encode(payload).decode()}\r\n"
        "--B--\r\n"
    ).encode()


async def test_same_message_id_never_overwrites_another_messages_files(tmp_path: Path) -> None:
    # The reviewer's demo: a second message hides the victim's Message-ID in an
    # encoded word (so the transport's early duplicate check misses it); it is
    # dropped as a duplicate only after the pipeline ran, which then already
    # saved its attachment. It must land in its own directory.
    config = inbound_config(tmp_path, allowed_senders=["*"])
    victim_id = "<inv-42@boss.example>"
    real = _invoice("boss@boss.example", victim_id, b"real invoice IBAN DE00 1111")
    coded = "=?utf-8?q?" + victim_id.replace("=", "=3D") + "?="
    fake = _invoice("mallory@evil.example", coded, b"fake invoice IBAN XX99 6666")
    first = await InboundPipeline(config).process(real, arrival=ARRIVAL)
    second = await InboundPipeline(config).process(fake, arrival=ARRIVAL)
    assert first.message is not None and second.message is not None
    assert first.message.id == second.message.id == victim_id
    (mine,), (theirs,) = first.message.attachments, second.message.attachments
    assert mine.path is not None and theirs.path is not None
    assert mine.path != theirs.path
    assert mine.path.read_bytes() == b"real invoice IBAN DE00 1111"
    assert mine.path.parent == message_dir(config.attachments_path.resolve(), message_key(real))


def _mail_with_attachment(disposition: bytes) -> bytes:
    head = disposition
    if not head.startswith(b"Content-Type"):
        head = b"Content-Type: application/pdf\r\n" + disposition
    return (
        b"From: anna@example.com\r\nMessage-ID: <names@example.com>\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--b\r\n" + head + b"\r\n\r\n%PDF\r\n--b--\r\n"
    )


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        # Raw UTF-8 in a quoted name (what many clients send).
        (
            'Content-Disposition: attachment; filename="Bericht März.pdf"'.encode(),
            "Bericht März.pdf",
        ),
        # RFC 2231, in one piece and in continuations.
        (b"Content-Disposition: attachment; filename*=utf-8''%E6%97%A5%E6%9C%AC.pdf", "日本.pdf"),
        (
            b"Content-Disposition: attachment;\r\n filename*0*=utf-8''%E6%97%A5;\r\n"
            b" filename*1*=%E6%9C%AC%E8%AA%9E.pdf",
            "日本語.pdf",
        ),
        # Raw UTF-8 in the Content-Type name parameter.
        (b'Content-Type: application/pdf; name="\xc3\xa9t\xc3\xa9.pdf"', "été.pdf"),
        # Control characters inside the name are dropped.
        (b'Content-Disposition: attachment; filename="a\x0bb\x1cc.pdf"', "abc.pdf"),
    ],
)
async def test_attachment_names_are_decoded_not_replaced(
    disposition: bytes, expected: str, tmp_path: Path
) -> None:
    config = inbound_config(tmp_path, attachment_types=["*"])
    outcome = await InboundPipeline(config).process(
        _mail_with_attachment(disposition), arrival=ARRIVAL
    )
    assert outcome.message is not None
    (found,) = outcome.message.attachments
    assert found.filename == expected
    assert found.path is not None and found.path.name == expected


async def test_a_long_cjk_name_is_cut_in_bytes_and_saved(tmp_path: Path) -> None:
    name = "報告書" * 33 + "X.pdf"  # 105 characters, 305 bytes in UTF-8
    disposition = f'Content-Disposition: attachment; filename="{name}"'.encode()
    config = inbound_config(tmp_path, attachment_types=["*"])
    outcome = await InboundPipeline(config).process(
        _mail_with_attachment(disposition), arrival=ARRIVAL
    )
    assert outcome.message is not None
    (found,) = outcome.message.attachments
    assert found.skipped_reason is None and found.path is not None
    assert found.path.read_bytes() == b"%PDF"
    assert len(found.filename.encode()) <= 200 and found.filename.endswith(".pdf")
    assert name.startswith(found.filename.removesuffix(".pdf"))


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
async def test_attachment_files_are_private_whatever_the_umask(umask: int, tmp_path: Path) -> None:
    config = inbound_config(tmp_path, attachment_types=["*"])
    disposition = b'Content-Disposition: attachment; filename="r.pdf"'
    old = os.umask(umask)
    try:
        outcome = await InboundPipeline(config).process(
            _mail_with_attachment(disposition), arrival=ARRIVAL
        )
    finally:
        os.umask(old)
    assert outcome.message is not None
    (found,) = outcome.message.attachments
    assert found.path is not None
    assert found.path.stat().st_mode & 0o777 == 0o600
    assert found.path.parent.stat().st_mode & 0o777 == 0o700
    assert config.attachments_path.stat().st_mode & 0o777 == 0o700
