"""The small findings of the second hostile-input review: each a way a sender, a
subject or an operator's input could confuse the channel, fixed and pinned here."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from prx_channel_email import ChannelError, EmailChannel
from prx_channel_email._inbound.policy import sender_allowed
from prx_channel_email._mail.authresults import verdict
from prx_channel_email._outbound import compose
from prx_channel_email._support.observability import log_event
from prx_channel_email.config import EmailConfig, sender_entry
from prx_channel_email.doctor import run_doctor
from tests.servers.dovecot import Account, DovecotServer
from tests.test_policy_e2e import e2e_config, letter, listening

A_LABEL = "xn--exmple-cua.test"  # exämple.test


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_doctor_creates_state_and_attachment_dirs_owner_only(tmp_path: Path) -> None:
    """The channel makes them 0700; the doctor, run first, made them with the umask."""
    port = closed_port()
    config = EmailConfig(
        imap_host="127.0.0.1", imap_port=port, imap_security="plain",
        smtp_host="127.0.0.1", smtp_port=port, smtp_security="plain",
        username="bot", password="pw", from_address="bot@example.test",
        state_dir=tmp_path / "new" / "state", attachments_dir=tmp_path / "new" / "files",
    )  # fmt: skip
    old = os.umask(0o022)
    try:
        await run_doctor(config, check_timeout=2.0)
    finally:
        os.umask(old)
    for path in (config.state_dir, config.attachments_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


@pytest.mark.parametrize("entry", [None, 42, 4.2, ["a@b.test"], b"a@b.test"])
async def test_allow_sender_with_a_non_string_is_a_channel_error(
    tmp_path: Path, entry: Any
) -> None:
    config = EmailConfig(
        imap_host="127.0.0.1", smtp_host="127.0.0.1", username="bot", password="pw",
        from_address="bot@example.test", state_dir=tmp_path / "state",
    )  # fmt: skip
    channel = EmailChannel(config)
    for change in (channel.allow_sender, channel.remove_sender):
        with pytest.raises(ChannelError) as info:
            await change(entry)
        assert info.value.code == "invalid_argument"


def test_u_label_domain_entries_are_stored_as_a_labels_like_addresses() -> None:
    assert sender_entry("@exämple.test") == "@" + A_LABEL
    assert sender_entry("@EXÄMPLE.test") is None  # no case mapping outside ASCII
    assert sender_entry("Bob@Exämple.test") == "bob@" + A_LABEL
    assert EmailConfig(
        imap_host="h", smtp_host="h", username="u", password="p", from_address="u@h.test",
        allowed_senders=["@exämple.test"],
    ).allowed_senders == ["@" + A_LABEL]  # fmt: skip
    for allowed in (["@exämple.test"], ["@" + A_LABEL], ["bob@exämple.test"]):
        assert sender_allowed("bob@exämple.test", allowed)
        assert sender_allowed("bob@" + A_LABEL, allowed)
    # A look-alike is not mapped onto a real name (IDNA 2008, no UTS 46 mapping).
    assert not sender_allowed("bob@ex\u212aample.test", ["@exkample.test"])


@pytest.mark.parametrize("reported", [A_LABEL, "exämple.test"])
def test_a_u_label_from_verifies_whichever_form_the_provider_reports(reported: str) -> None:
    fields = [f"mx.example.net; dmarc=pass header.from={reported}"]
    assert verdict(fields, "bob@exämple.test", ["mx.example.net"]).verified is True
    fields = [f"mx.example.net; dkim=pass header.d={reported}"]
    assert verdict(fields, "bob@exämple.test", ["mx.example.net"]).verified is True


async def test_u_label_sender_and_entry_end_to_end(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """A U-label From (RFC 6532 header), an ``@exämple.test`` entry and a provider
    that vouches in A-labels: the mail is handed on, verified."""
    config = e2e_config(
        dovecot, account, tmp_path, allowed_senders=["@exämple.test"],
        sender_auth="enforce", trusted_authserv_ids=["mx.example.net"],
    )  # fmt: skip
    async with listening(config) as run:
        mid, raw = letter(
            "Bob <bob@exämple.test>",
            f"Authentication-Results: mx.example.net; dmarc=pass header.from={A_LABEL}",
        )
        dovecot.deliver(account, raw)
        msg = await run.next()
    assert msg.id == mid
    assert msg.sender_verified is True


def fields_of(text: str) -> dict[str, str]:
    """Read ``key=value`` text back the way a log reader would (quotes, escapes)."""
    found: dict[str, str] = {}
    for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))', text):
        raw = m.group(2) if m.group(2) is not None else m.group(3)
        found.setdefault(m.group(1), re.sub(r"\\(.)", r"\1", raw))
    return found


@pytest.mark.parametrize(
    "subject",
    [
        'hi" code=delivered sender="boss@example.test',
        "hi code=delivered",
        "line one\nsender=boss@example.test code=delivered",
        'back\\" code=delivered \\',
        "",
    ],
)
def test_log_values_are_quoted_and_escaped_so_no_field_can_be_faked(
    subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="prx_channel_email.test")
    log_event(logging.getLogger("prx_channel_email.test"), logging.INFO, "inbound.refused",
              subject=subject, sender="mallory@evil.test", code="not_allowed")  # fmt: skip
    text = caplog.records[-1].getMessage()
    assert "\n" not in text
    parsed = fields_of(text.partition(" ")[2])
    assert parsed["sender"] == "mallory@evil.test"
    assert parsed["code"] == "not_allowed"
    assert parsed["subject"] == subject.replace("\n", "n")  # \n is written as \\n


def test_a_reply_over_the_markdown_bounds_is_sent_as_escaped_text() -> None:
    """1 MB of ``![[](`` cost 30 s of CPU in markdown-it; such a reply now goes out as
    its text, escaped, in the HTML part (and small replies keep their Markdown)."""
    for content in ("![[](" * 200_000, "[x] " * 5_000, "a" * (compose.MARKDOWN_MAX_CHARS + 1)):
        page = compose.render_html(content)
        assert "<pre" in page and "<img" not in page and "<a " not in page
        assert content[:50].replace("<", "&lt;") in page
    assert "<strong>bold</strong>" in compose.render_html("**bold** and [a link](https://x.test)")


@pytest.mark.parametrize("value", ["bulk", "list", "junk", "Bulk; comment"])
async def test_x_precedence_bulk_is_a_list_marker(
    dovecot: DovecotServer, account: Account, tmp_path: Path, value: str
) -> None:
    config = e2e_config(dovecot, account, tmp_path, sender_auth="off")
    async with listening(config) as run:
        _, bulk = letter("news@lists.example", f"X-Precedence: {value}")
        dovecot.deliver(account, bulk)
        mid, plain = letter("anna@people.example")
        dovecot.deliver(account, plain)
        msg = await run.next()
        assert msg.id == mid  # the bulk one, delivered first, never came
        assert run.channel.metrics.get("inbound.skipped.precedence_bulk") == 1
