"""Policy: allow-list forms, loop guards, rate limit and sender authenticity."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._inbound.policy import sender_allowed
from prx_channel_email._mail.authresults import authserv_id_of, parse_auth_results, sender_verified
from prx_channel_email._mail.envelope import envelope
from prx_channel_email._mail.headers import Headers
from prx_channel_email._mail.message_ids import mint_message_id
from prx_channel_email._support.observability import Metrics
from prx_channel_email.config import EmailConfig
from tests.inbound_helpers import ARRIVAL, BOT, inbound_config

_counter = iter(range(1_000_000))


def mail(sender: str = "anna@example.com", *extra: str, mid: str | None = None) -> bytes:
    """A small message from ``sender`` with extra header lines."""
    mid = mid or f"<m{next(_counter)}@example.com>"
    lines = [f"From: {sender}", f"To: {BOT}", "Subject: hi", f"Message-ID: {mid}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\nhello\r\n").encode()


def pipeline(tmp_path: Path, clock: Any = None, **overrides: Any) -> InboundPipeline:
    return InboundPipeline(
        inbound_config(tmp_path, **overrides),
        metrics=Metrics(),
        clock=clock or (lambda: ARRIVAL),
    )


# --- allow-list ---


@pytest.mark.parametrize(
    ("allowed", "sender", "expected"),
    [
        (["anna@example.com"], "ANNA@Example.com", True),
        (["Anna@Example.COM"], "anna@example.com", True),
        (["anna@example.com"], "anna2@example.com", False),
        (["@example.com"], "x@example.com", True),
        (["@example.com"], "x@sub.example.com", False),
        (["@example.com"], "x@notexample.com", False),
        (["@example.com"], "x@example.com.evil", False),
        (["*"], "anyone@anywhere.example", True),
        ([], "anna@example.com", False),
    ],
)
def test_allow_list_forms(allowed: list[str], sender: str, expected: bool) -> None:
    assert sender_allowed(sender, allowed) is expected


@pytest.mark.parametrize(
    ("allowed", "sender", "decision"),
    [
        (["anna@example.com"], "Anna <ANNA@example.com>", "deliver"),
        (["@example.com"], "bob@example.com", "deliver"),
        (["@example.com"], "bob@sub.example.com", "reject"),
        (["*"], "who@ever.example", "deliver"),
        ([], "anna@example.com", "reject"),
        # The display name is not the address: a lookalike name is not allowed in.
        (["anna@example.com"], '"anna@example.com" <evil@attacker.example>', "reject"),
    ],
)
async def test_allow_list_decides_delivery(
    tmp_path: Path, allowed: list[str], sender: str, decision: str
) -> None:
    p = pipeline(tmp_path, allowed_senders=allowed)
    outcome = await p.process(mail(sender), arrival=ARRIVAL)
    assert outcome.decision == decision
    if decision == "reject":
        assert outcome.reason == "not_allowed"
        assert p.metrics.get("inbound.skipped.not_allowed") == 1
    else:
        assert p.metrics.get("inbound.delivered") == 1


async def test_rejection_is_logged_with_reason_and_no_attachment_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = pipeline(tmp_path)
    raw = (
        b"From: stranger@evil.example\r\nMessage-ID: <s@evil.example>\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
        b"hi\r\n--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
        b"filename=a.txt\r\n\r\nsecret\r\n--b--\r\n"
    )
    with caplog.at_level(logging.INFO, logger="prx_channel_email"):
        outcome = await p.process(raw, arrival=ARRIVAL)
    assert (outcome.decision, outcome.reason) == ("reject", "not_allowed")
    records = [
        r for r in caplog.records if getattr(r, "prx", {}).get("event") == "inbound.rejected"
    ]
    assert records and records[0].prx["code"] == "not_allowed"
    assert records[0].prx["sender"] == "stranger@evil.example"
    assert records[0].prx["message_id"] == "<s@evil.example>"
    assert not (tmp_path / "attachments").exists()


# --- loop guards ---


@pytest.mark.parametrize(
    ("headers", "sender", "reason"),
    [
        (["Auto-Submitted: auto-replied"], "anna@example.com", "auto_submitted"),
        (["Auto-Submitted: auto-generated"], "anna@example.com", "auto_submitted"),
        (
            ["Auto-Submitted: Auto-Notified; owner-email=x@example.com"],
            "anna@example.com",
            "auto_submitted",
        ),
        (["Precedence: bulk"], "anna@example.com", "precedence_bulk"),
        (["Precedence: list"], "anna@example.com", "precedence_bulk"),
        (["Precedence: junk"], "anna@example.com", "precedence_bulk"),
        (["Precedence: auto_reply"], "anna@example.com", "precedence_bulk"),
        (["X-Autoreply: yes"], "anna@example.com", "auto_reply"),
        (["X-Autorespond: yes"], "anna@example.com", "auto_reply"),
        (["X-Auto-Response-Suppress: OOF"], "anna@example.com", "auto_reply"),
        (["List-Id: <devs.example.com>"], "anna@example.com", "list_mail"),
        (["List-Unsubscribe: <mailto:leave@example.com>"], "anna@example.com", "list_mail"),
        (["Return-Path: <>"], "anna@example.com", "bounce"),
        (["Return-Path: < >"], "anna@example.com", "bounce"),
        ([], "MAILER-DAEMON@example.com", "bounce"),
        ([], "postmaster@example.com", "bounce"),
        ([], BOT.upper(), "own_address"),
        ([], "alias@example.com", "own_address"),
    ],
)
async def test_loop_guards(tmp_path: Path, headers: list[str], sender: str, reason: str) -> None:
    p = pipeline(tmp_path, allowed_senders=["*"], own_addresses=["alias@example.com"])
    outcome = await p.process(mail(sender, *headers), arrival=ARRIVAL)
    assert (outcome.decision, outcome.reason) == ("reject", reason)
    assert p.metrics.get(f"inbound.skipped.{reason}") == 1
    assert p.metrics.get("inbound.delivered") == 0


async def test_own_minted_message_id_is_rejected(tmp_path: Path) -> None:
    p = pipeline(tmp_path, allowed_senders=["*"])
    outcome = await p.process(mail(mid=mint_message_id(BOT)), arrival=ARRIVAL)
    assert (outcome.decision, outcome.reason) == ("reject", "own_message_id")


@pytest.mark.parametrize(
    "headers",
    [
        ["Auto-Submitted: no"],
        ["Precedence: first-class"],
        [f"In-Reply-To: {mint_message_id(BOT)}", f"References: {mint_message_id(BOT)}"],
        ["Return-Path: <anna@example.com>"],
    ],
)
async def test_ordinary_replies_pass_the_loop_guards(tmp_path: Path, headers: list[str]) -> None:
    p = pipeline(tmp_path)
    outcome = await p.process(mail("anna@example.com", *headers), arrival=ARRIVAL)
    assert outcome.decision == "deliver"


# --- rate limit ---


async def test_the_policy_never_refuses_mail_for_rate(tmp_path: Path) -> None:
    """Issue 11: mail over the rate limit is deferred by the hand-off (deferred.py,
    tests/test_ratelimit.py, tests/test_ratelimit_e2e.py), never refused here."""
    now = [ARRIVAL]
    p = pipeline(tmp_path, clock=lambda: now[0], rate_limit_count=3, rate_limit_window_secs=60)
    decisions = [(await p.process(mail("anna@example.com"))).decision for _ in range(4)]
    assert decisions == ["deliver"] * 4
    assert not any("rate" in k for k in p.metrics.snapshot())


# --- sender authenticity ---

TRUSTED = ["mx.example.net"]


def auth(*fields: str, sender: str = "ceo@example.com") -> bool | None:
    block = "".join(f"Authentication-Results: {f}\r\n" for f in fields) + f"From: {sender}\r\n"
    return sender_verified(Headers.from_block(block.encode()), sender, TRUSTED).verified


def test_dmarc_pass_from_trusted_server_verifies() -> None:
    assert auth("mx.example.net; dmarc=pass (p=reject) header.from=example.com") is True


def test_aligned_spf_or_dkim_pass_verifies() -> None:
    assert auth("mx.example.net; spf=pass smtp.mailfrom=bounce@mail.example.com") is True
    assert auth("mx.example.net; dkim=pass header.d=example.com header.s=sel") is True
    assert auth("mx.example.net; dkim=pass header.i=@example.com") is True


def test_unaligned_pass_does_not_verify() -> None:
    # A pass for another domain says nothing about the From domain: not verified,
    # but not "failed" either (False is kept for a server saying the check failed).
    assert (
        auth("mx.example.net; spf=pass smtp.mailfrom=evil.example; dkim=pass header.d=evil.example")
        is None
    )


def test_a_pass_for_a_bare_top_level_domain_is_not_aligned() -> None:
    assert auth("mx.example.net; dkim=pass header.d=com", sender="ceo@example.com") is None


def test_dmarc_fail_wins_over_spf_pass() -> None:
    assert (
        auth(
            "mx.example.net; spf=pass smtp.mailfrom=example.com; dmarc=fail header.from=example.com"
        )
        is False
    )


def test_only_the_topmost_field_counts() -> None:
    # A sender-planted field with our provider's id below the real one counts for nothing.
    assert (
        auth(
            "mx.example.net; dmarc=fail header.from=example.com",
            "mx.example.net; dmarc=pass header.from=example.com",
        )
        is False
    )
    # A foreign topmost field means our provider did not vouch: anything below is ignored.
    assert (
        auth(
            "relay.evil.example; dmarc=pass header.from=example.com",
            "mx.example.net; dmarc=pass header.from=example.com",
        )
        is None
    )


def test_no_trusted_field_means_unknown() -> None:
    assert auth() is None
    assert auth("other.example; dmarc=pass header.from=example.com") is None
    assert auth("mx.example.net; none") is None
    headers = Headers.from_block(b"Authentication-Results: mx.example.net; dmarc=pass\r\n")
    assert sender_verified(headers, "ceo@example.com", []).verified is None


def test_wildcard_and_id_less_entries() -> None:
    block = b"Authentication-Results: mx5.example.net; dkim=pass header.d=example.com\r\n"
    h = Headers.from_block(block)
    assert sender_verified(h, "a@example.com", ["*.example.net"]).verified is True
    assert sender_verified(h, "a@example.com", ["example.net"]).verified is None
    microsoft = (
        b"Authentication-Results: spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=example.com;"
        b" dkim=pass (signature was verified) header.d=example.com;dmarc=pass action=none"
        b" header.from=example.com;compauth=pass reason=100\r\n"
    )
    h = Headers.from_block(microsoft)
    assert sender_verified(h, "a@example.com", ["@none"]).verified is True
    assert sender_verified(h, "a@example.com", ["mx.example.net"]).verified is None


# --- Authentication-Results is tokenized, not searched (RFC 8601) ---

VICTIM = "ceo@victim.com"


def auth_v(value: str, sender: str = VICTIM) -> Any:
    block = f"Authentication-Results: {value}\r\nFrom: {sender}\r\n".encode()
    return sender_verified(Headers.from_block(block), sender, TRUSTED)


@pytest.mark.parametrize(
    "value",
    [
        # The reviewer's inputs: the trusted server faithfully echoes an attacker's
        # envelope sender, whose quoted local part may hold ";" (RFC 5321).
        'mx.example.net; spf=pass smtp.mailfrom="x;dmarc=pass header.from=victim.com;"@evil.com;'
        " dmarc=none header.from=victim.com",
        'mx.example.net; spf=pass (mx.example.net: domain of "x);dmarc=pass header.from=victim.com;'
        '"@evil.com designates 192.0.2.1 as permitted sender) smtp.mailfrom=evil.com;'
        " dmarc=none header.from=victim.com",
        # The same, with the quote balanced so the RFC 5322 reading is well-formed.
        'mx.example.net; spf=pass (domain of "x);dmarc=pass header.from=victim.com;(\\""@evil.com'
        " designates 192.0.2.1) smtp.mailfrom=evil.com; dmarc=none header.from=victim.com",
        # An escaped quote inside the quoted local part.
        'mx.example.net; spf=pass smtp.mailfrom="x\\";dmarc=pass header.from=victim.com;"@evil.com',
        # Encoded words are not decoded (RFC 8601 has none).
        "mx.example.net; spf=pass smtp.mailfrom==?utf-8?q?x=3Bdmarc=3Dpass_header.from=3D"
        "victim.com?=@evil.com",
        # An "=" in an unquoted local part is not a property separator.
        "mx.example.net; spf=pass smtp.mailfrom=victim.com=x@evil.com",
        # A comment that never closes, a stray ")".
        "mx.example.net; spf=pass (x smtp.mailfrom=victim.com",
        "mx.example.net; spf=pass x) smtp.mailfrom=victim.com",
    ],
)
def test_echoed_sender_text_cannot_forge_a_pass(value: str) -> None:
    assert auth_v(value).verified is not True


def test_a_method_stated_twice_is_ambiguous_and_never_verifies() -> None:
    # A HELO name echoed into a comment can close it and "say" a clause (both
    # readings agree here): the injected result, before or after the real one,
    # must not count.
    injected = "dmarc=pass header.from=victim.com"
    real = "dmarc=none header.from=victim.com"
    assert auth_v(f"mx.example.net; spf=none (helo x);{injected};(y); {real}").verified is None
    assert auth_v(f"mx.example.net; {real}; spf=none (helo x);{injected};(y)").verified is None
    dkim = "dkim=pass header.d=victim.com"
    assert auth_v(f"mx.example.net; {dkim}; dkim=none; dmarc=none").verified is None
    # A real DMARC fail is not hidden by an injected pass.
    failed = f"mx.example.net; {injected}; dmarc=fail header.from=victim.com"
    assert auth_v(failed).verified is False
    # Two DKIM signatures are fine when DMARC itself passes.
    two = f"mx.example.net; {dkim}; dkim=pass header.d=esp.example; {injected}"
    assert auth_v(two).verified is True


def test_comments_nest_and_escape_and_quoted_strings_stay_whole() -> None:
    nested = (
        "mx.example.net (a (nested) comment \\) still); dkim=pass (sig (ok)) header.d=victim.com"
    )
    assert auth_v(nested).verified is True
    assert auth_v('mx.example.net; spf=pass smtp.mailfrom="a;b"@victim.com').verified is True
    assert auth_v("mx.example.net; dmarc = pass header.from = victim.com").verified is True
    assert auth_v("mx.example.net; dkim/1=pass header.d=victim.com").verified is True
    assert authserv_id_of("mx.example.net (x; y) 1; dmarc=pass")[0] == "mx.example.net"
    assert authserv_id_of("spf=pass smtp.mailfrom=x")[0] == ""


@pytest.mark.parametrize(
    ("value", "verified"),
    [
        ("dmarc=pass header.from=victim.com", True),
        # header.from is optional in RFC 8601: without it the pass is about nobody known.
        ("dmarc=pass", None),
        ("dmarc=pass header.from=other.example", None),
        ("dmarc=pass header.from=sub.victim.com", None),  # must equal, not be aligned
        ("dmarc=pass header.from=victim.com header.from=victim.com", None),  # repeated
        ("dmarc=pass header.from=other.example; spf=pass smtp.mailfrom=victim.com", True),
    ],
)
def test_dmarc_pass_needs_header_from_equal_to_the_from_domain(
    value: str, verified: bool | None
) -> None:
    assert auth_v(f"mx.example.net; {value}").verified is verified


@pytest.mark.parametrize(
    ("value", "verified"),
    [
        # False means a trusted server said the check failed ...
        ("dmarc=fail header.from=victim.com", False),
        ("dmarc=permerror header.from=victim.com", False),
        ("dmarc=fail", False),
        ("spf=fail smtp.mailfrom=victim.com; dmarc=none", False),
        ("dkim=permerror header.d=victim.com", False),
        # ... and nothing else does.
        ("dmarc=none header.from=victim.com", None),
        ("dmarc=temperror header.from=victim.com", None),
        ("spf=softfail smtp.mailfrom=victim.com; dmarc=none", None),
        ("spf=neutral smtp.mailfrom=victim.com", None),
        ("spf=temperror smtp.mailfrom=victim.com; dkim=none", None),
        ("spf=fail smtp.mailfrom=evil.example; dmarc=none", None),  # another domain failed
        ("dmarc=fail header.from=other.example", None),
        # An aligned pass outweighs a broken second route (as in DMARC).
        ("spf=fail smtp.mailfrom=victim.com; dkim=pass header.d=victim.com", True),
        ("spf=pass smtp.mailfrom=victim.com; dmarc=temperror", True),
    ],
)
def test_false_only_when_a_trusted_server_says_the_check_failed(
    value: str, verified: bool | None
) -> None:
    assert auth_v(f"mx.example.net; {value}").verified is verified


_AR_ALPHABET = st.sampled_from([*list('ab;=()"\\ .@/-'), "dmarc", "pass", "header.from"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_AR_ALPHABET, max_size=40).map("".join))
def test_any_authentication_results_text_is_read_or_refused_without_raising(text: str) -> None:
    parsed = parse_auth_results(text)
    if parsed is not None:
        assert all(r.method and r.result for r in parsed.results)
    auth_v(f"mx.example.net; {text}")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*list('ab<>,;:()"\\ .@'), "=?utf-8?q?x?="]), max_size=30))
def test_any_from_text_yields_at_most_one_sender_without_raising(chars: list[str]) -> None:
    raw = ("From: " + "".join(chars) + "\r\n").encode()
    env = envelope(Headers.from_block(raw), raw, ARRIVAL)
    assert (env.sender == "") == (env.sender_problem is not None)
    assert env.sender.count("@") <= 1


# --- the From mailbox ---


@pytest.mark.parametrize(
    ("from_lines", "reason", "sender"),
    [
        # An unquoted display name that looks like an address is still only a name.
        (["alice@victim.com <eve@evil.com>"], "not_allowed", "eve@evil.com"),
        (['"alice@victim.com" <eve@evil.com>'], "not_allowed", "eve@evil.com"),
        (["=?utf-8?q?alice=40victim.com?= <eve@evil.com>"], "not_allowed", "eve@evil.com"),
        # Text beside the address, or two mailboxes: whose mail is it? Nobody's.
        (["<alice@victim.com>eve@evil.com"], "ambiguous_sender", ""),
        (["<alice@victim.com> <eve@evil.com>"], "ambiguous_sender", ""),
        (["alice@victim.com, eve@evil.com"], "ambiguous_sender", ""),
        (["Alice <alice@victim.com>, Eve <eve@evil.com>"], "ambiguous_sender", ""),
        (["alice@victim.com eve@evil.com"], "ambiguous_sender", ""),
        (["alice@victim.com", "eve@evil.com"], "ambiguous_sender", ""),  # two From fields
        # Nothing readable.
        ([], "no_sender", ""),
        ([""], "no_sender", ""),
        (["Alice"], "no_sender", ""),
        (["undisclosed-recipients:;"], "no_sender", ""),
        (["=?utf-8?b?PGFsaWNlQHZpY3RpbS5jb20+?="], "no_sender", ""),  # "<alice@victim.com>"
        (['"alice@victim.com"@evil.com'], "no_sender", ""),
        (["<alice@victim.com"], "ambiguous_sender", ""),
    ],
)
async def test_exactly_one_well_formed_from_mailbox(
    tmp_path: Path, from_lines: list[str], reason: str, sender: str
) -> None:
    p = pipeline(tmp_path, allowed_senders=["alice@victim.com"])
    lines = [f"From: {v}" for v in from_lines]
    lines += ["Sender: alice@victim.com", "To: bot@example.net", "Message-ID: <f@x>"]
    raw = ("\r\n".join(lines) + "\r\n\r\nhello\r\n").encode()
    outcome = await p.process(raw, arrival=ARRIVAL)
    assert (outcome.decision, outcome.reason) == ("reject", reason)
    env = envelope(Headers.from_block(raw.split(b"\r\n\r\n")[0] + b"\r\n"), raw, ARRIVAL)
    assert env.sender == sender
    assert p.metrics.get(f"inbound.skipped.{reason}") == 1


@pytest.mark.parametrize(
    ("value", "sender", "display"),
    [
        ('"boss@example.com" <evil@attacker.example>', "evil@attacker.example", "boss@example.com"),
        ("Anna <Anna@Example.COM>", "anna@example.com", "Anna"),
        ("anna@example.com (Anna B)", "anna@example.com", "Anna B"),
        ('"Miller, Tom" <tom.miller@example.com>', "tom.miller@example.com", "Miller, Tom"),
        ('"anna"@example.com', "anna@example.com", None),
        (" < anna@example.com > ", "anna@example.com", None),
        ("Anna <anna@example.com>,", "anna@example.com", "Anna"),
    ],
)
def test_well_formed_from_forms(value: str, sender: str, display: str | None) -> None:
    raw = f"From: {value}\r\n".encode()
    env = envelope(Headers.from_block(raw), raw, ARRIVAL)
    assert (env.sender, env.sender_display, env.sender_problem) == (sender, display, None)


FORGED = "Authentication-Results: mx.example.net; dmarc=fail header.from=example.com"
PASSED = "Authentication-Results: mx.example.net; dmarc=pass header.from=example.com"


@pytest.mark.parametrize(
    ("mode", "trusted", "header", "decision", "verified"),
    [
        ("off", TRUSTED, FORGED, "deliver", None),
        ("flag", TRUSTED, FORGED, "deliver", False),
        ("flag", TRUSTED, PASSED, "deliver", True),
        ("enforce", TRUSTED, FORGED, "reject", None),
        ("enforce", TRUSTED, PASSED, "deliver", True),
        ("enforce", TRUSTED, None, "reject", None),  # trusted ids set, but no trusted verdict
        ("enforce", [], FORGED, "reject", None),  # nothing trusted: nothing verifies
        ("enforce", [], PASSED, "reject", None),  # nothing trusted: nothing verifies
    ],
)
async def test_sender_auth_modes(
    tmp_path: Path,
    mode: str,
    trusted: list[str],
    header: str | None,
    decision: str,
    verified: bool | None,
) -> None:
    p = pipeline(tmp_path, sender_auth=mode, trusted_authserv_ids=trusted)
    extra = [header] if header else []
    outcome = await p.process(mail("ceo@example.com", *extra), arrival=ARRIVAL)
    assert outcome.decision == decision
    if decision == "reject":
        assert outcome.reason == "unverified_sender"
    else:
        assert outcome.message is not None
        assert outcome.message.sender_verified is verified


async def test_delivered_outcome_carries_the_ledger_entry(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    raw = mail(
        "Anna <anna@example.com>",
        "Reply-To: Desk <desk@example.com>",
        "References: <r1@x> <r2@x>",
        "In-Reply-To: <r2@x>",
        mid="<e1@example.com>",
    )
    outcome = await p.process(raw, arrival=ARRIVAL + 5)
    assert outcome.entry is not None
    assert outcome.entry.message_id == "<e1@example.com>"
    assert outcome.entry.sender == "anna@example.com"
    assert outcome.entry.reply_target == "desk@example.com"
    assert outcome.entry.thread_ts == "<r1@x>"
    assert outcome.entry.references == ["<r1@x>", "<r2@x>"]
    assert outcome.entry.received_at == ARRIVAL + 5


async def test_oversized_mail_is_judged_on_headers(tmp_path: Path) -> None:
    p = pipeline(tmp_path, max_message_bytes=1000)
    header = mail("anna@example.com", mid="<huge@example.com>").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    outcome = await p.process_oversized(header, 50_000_000, arrival=ARRIVAL)
    assert outcome.decision == "deliver" and outcome.message is not None
    assert outcome.message.id == "<huge@example.com>"
    assert "50000000 bytes" in outcome.message.content
    stranger = mail("x@evil.example").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    rejected = await p.process_oversized(stranger, 50_000_000, arrival=ARRIVAL)
    assert (rejected.decision, rejected.reason) == ("reject", "not_allowed")


# --- secure defaults (issue 11) ---


def test_default_is_enforce_and_known_providers_are_preset(tmp_path: Path) -> None:
    base = {
        "smtp_host": "smtp.example.test",
        "username": "bot",
        "password": "pw",
        "from_address": "bot@example.test",
        "state_dir": tmp_path,
    }

    def ids(**kw: Any) -> list[str]:
        config = EmailConfig(**{**base, **kw})
        assert config.sender_auth == "enforce"
        return config.trusted_authserv_ids

    assert ids(imap_host="imap.gmail.com") == ["mx.google.com"]
    assert ids(imap_host="IMAP.GMAIL.COM.") == ["mx.google.com"]
    assert ids(imap_host="outlook.office365.com") == ["@none"]
    assert ids(imap_host="imap-mail.outlook.com") == ["@none"]
    assert ids(imap_host="imap.example.test") == []
    # An explicit list wins over the preset, even an empty one.
    assert ids(imap_host="imap.gmail.com", trusted_authserv_ids=[]) == []
    assert ids(imap_host="imap.gmail.com", trusted_authserv_ids=["mx.example.test"]) == [
        "mx.example.test"
    ]


async def test_nothing_trusted_refuses_and_says_why_once_per_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = pipeline(tmp_path, sender_auth="enforce", trusted_authserv_ids=[])
    caplog.set_level(logging.DEBUG, logger="prx_channel_email")
    outcomes = [await p.process(mail("ceo@example.com", PASSED)) for _ in range(3)]
    outcomes.append(await p.process(mail("juergen@example.de")))
    assert [(o.decision, o.reason) for o in outcomes] == [("reject", "unverified_sender")] * 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.prx["sender"] for r in warnings] == ["ceo@example.com", "juergen@example.de"]
    assert "trusted_authserv_ids is empty" in warnings[0].prx["detail"]
    # The repeats are still recorded, one debug line each.
    repeats = [
        r for r in caplog.records if r.levelno == logging.DEBUG and "rejected" in r.msg % r.args
    ]
    assert len(repeats) == 2


async def test_reject_outcome_carries_sender_subject_reason_and_id(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    outcome = await p.process(mail("eve@evil.test", mid="<x1@evil.test>"))
    assert outcome.decision == "reject"
    assert (outcome.message_id, outcome.sender, outcome.subject, outcome.reason) == (
        "<x1@evil.test>",
        "eve@evil.test",
        "hi",
        "not_allowed",
    )


# --- hostile input (issue 15) ---


async def test_reply_to_is_honoured_only_when_it_may_write_to_the_bot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = pipeline(tmp_path)
    caplog.set_level(logging.INFO, logger="prx_channel_email")
    allowed = await p.process(mail("anna@example.com", "Reply-To: Desk <Desk@Example.com>"))
    stranger = await p.process(mail("anna@example.com", "Reply-To: eve@evil.test"))
    assert allowed.message is not None and stranger.message is not None
    assert allowed.message.reply_target == "desk@example.com"
    assert stranger.message.reply_target == "anna@example.com"
    assert stranger.entry is not None and stranger.entry.reply_target == "anna@example.com"
    assert stranger.message.reply("ok").recipient == "anna@example.com"
    events = [getattr(r, "prx", {}) for r in caplog.records]
    codes = [e["code"] for e in events if e.get("event") == "inbound.reply_target"]
    assert codes == ["reply_to_allowed", "reply_to_not_allowed"]
    # The runtime allow-list counts too: once eve may write, replies may go to her.
    p.policy.set_runtime_senders(["eve@evil.test"], [])
    now = await p.process(mail("anna@example.com", "Reply-To: eve@evil.test"))
    assert now.message is not None and now.message.reply_target == "eve@evil.test"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Mailing-List: contact team-help@lists.example.com; run by ezmlm", "list_mail"),
        ("X-Mailing-List: <team@lists.example.com>", "list_mail"),
        ("List-Help: <mailto:team-request@lists.example.com?subject=help>", "list_mail"),
        ("List-Archive: <https://lists.example.com/team/>", "list_mail"),
        ("List-Owner: <mailto:owner@lists.example.com>", "list_mail"),
        ("List-Subscribe: <mailto:team-join@lists.example.com>", "list_mail"),
        ("X-Loop: helpdesk@example.com", "loop_marker"),
    ],
)
async def test_more_list_and_loop_markers(tmp_path: Path, header: str, reason: str) -> None:
    outcome = await pipeline(tmp_path).process(mail("anna@example.com", header))
    assert (outcome.decision, outcome.reason) == ("reject", reason)


async def test_a_look_alike_address_does_not_match_an_allowed_one(tmp_path: Path) -> None:
    kelvin = "\u212aate@example.test"  # KELVIN SIGN + "ate": str.lower() makes it "kate"
    assert not sender_allowed(kelvin, ["kate@example.test"])
    assert sender_allowed("Kate@Example.TEST", ["kate@example.test"])
    p = pipeline(tmp_path, allowed_senders=["kate@example.test"])
    outcome = await p.process(mail(f"Kate <{kelvin}>"))
    assert (outcome.decision, outcome.reason, outcome.sender) == ("reject", "not_allowed", kelvin)
    genuine = await p.process(mail("Kate <KATE@example.test>"))
    assert genuine.message is not None and genuine.message.sender == "kate@example.test"
    # Entries are folded the same way: a Kelvin-sign entry is not "kate" either.
    assert EmailConfig(
        imap_host="h", smtp_host="h", username="u", password="p", from_address="b@x.test",
        allowed_senders=["\u212aate@example.test"], state_dir=tmp_path,
    ).allowed_senders == ["\u212aate@example.test"]  # fmt: skip


def _forwarded(raw: bytes, *, drop: tuple[str, ...], replace: dict[str, str]) -> bytes:
    """``raw`` as a forwarder re-sends it: some fields dropped, some rewritten."""
    head, _, body = raw.partition(b"\r\n\r\n")
    out = []
    for line in head.decode().split("\r\n"):
        name = line.split(":", 1)[0].lower()
        if name in drop:
            continue
        out.append(f"{line.split(':', 1)[0]}: {replace[name]}" if name in replace else line)
    return ("\r\n".join(out) + "\r\n\r\n").encode() + body


async def test_our_own_reply_forwarded_back_is_not_delivered(tmp_path: Path) -> None:
    from prx_channel_email._outbound.compose import Parent, compose

    p = pipeline(tmp_path)
    parent = Parent("<q1@example.com>", "Question", [])
    ours = compose(p.config, content="the answer", recipient="anna@example.com", parent=parent)
    stripped = ("auto-submitted", "x-auto-response-suppress")
    rewritten = {"message-id": "<fwd-1@relay.example.com>", "from": "Anna <anna@example.com>"}
    # The stamp survives the forwarder: our own mail.
    back = _forwarded(ours.raw, drop=stripped, replace=rewritten)
    outcome = await p.process(back)
    assert (outcome.decision, outcome.reason) == ("reject", "own_mail")
    # A forwarder that also drops unknown fields but points Reply-To at the author
    # (us): not handed on either, but a person could write so too, so it is
    # quarantined (a warning naming sender and subject), not silently skipped.
    no_stamp = _forwarded(
        ours.raw,
        drop=(*stripped, "x-prx-channel"),
        replace={**rewritten, "to": f"{BOT}\r\nReply-To: {BOT}"},
    )
    outcome = await p.process(no_stamp)
    assert (outcome.decision, outcome.reason) == ("quarantine", "own_mail")
    assert (outcome.sender, outcome.subject) == ("anna@example.com", "Re: Question")
    assert p.metrics.get("inbound.quarantined") == 1
    # Another bot's mail (another account's stamp) is not ours.
    other = compose(
        inbound_config(tmp_path, username="other-bot"),
        content="hi",
        recipient="anna@example.com",
    )
    theirs = _forwarded(other.raw, drop=stripped, replace=rewritten)
    assert (await p.process(theirs)).decision == "deliver"
    # A person's answer to our reply is of course delivered.
    answer = await p.process(
        mail(
            "anna@example.com", f"In-Reply-To: {ours.message_id}", f"References: {ours.message_id}"
        )
    )
    assert answer.decision == "deliver"


async def test_a_provider_temperror_quarantines_an_allowed_senders_mail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A DNS timeout at the provider is not the sender's doing: under enforce the mail
    is not handed on, but it is quarantined with a warning rather than skipped."""
    p = pipeline(tmp_path, sender_auth="enforce", trusted_authserv_ids=TRUSTED)
    caplog.set_level(logging.INFO, logger="prx_channel_email")
    header = "Authentication-Results: mx.example.net; dmarc=temperror header.from=example.com"
    outcome = await p.process(mail("ceo@example.com", header))
    assert (outcome.decision, outcome.reason) == ("quarantine", "unverified_sender")
    assert outcome.detail == "temperror: dmarc"
    warned = [getattr(r, "prx", {}) for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.get("event") for w in warned] == ["inbound.quarantined"]
    assert warned[0]["sender"] == "ceo@example.com" and warned[0]["subject"] == "hi"
    # A plain failure is still refused outright.
    forged = await p.process(mail("ceo@example.com", FORGED))
    assert (forged.decision, forged.reason) == ("reject", "unverified_sender")


@pytest.mark.parametrize(
    ("mode", "trusted", "problem", "words"),
    [
        ("enforce", [], True, "trusted_authserv_ids is empty"),
        ("enforce", ["mx.example.net"], False, "refusing senders not verified by mx.example.net"),
        ("flag", ["mx.example.net"], False, "flagging"),
        ("flag", [], False, "sender_verified stays None"),
        ("off", ["mx.example.net"], True, "not verified"),
    ],
)
def test_run_says_what_sender_authenticity_does(
    tmp_path: Path, mode: str, trusted: list[str], problem: bool, words: str
) -> None:
    from prx_channel_email._inbound.policy import describe_sender_auth

    config = inbound_config(tmp_path, sender_auth=mode, trusted_authserv_ids=trusted)
    is_problem, line = describe_sender_auth(config)
    assert is_problem is problem and words in line
