"""One Authentication-Results reader: the doctor and the policy agree, field for field.

Each header set below is judged three ways: by the doctor's reading (what it
would tell the user to paste), by the inbound pipeline under "flag" (the
``sender_verified`` it sets) and under "enforce" (delivered or refused). They
must agree, and pasting the doctor's line must make the policy believe the very
field the doctor showed, never a lower, planted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._mail.authresults import organizational_domain, provider_field, trust_line
from prx_channel_email.doctor import judge_auth, read_auth
from tests.inbound_helpers import ARRIVAL, inbound_config

GOOGLE = "mx.google.com"


def block(sender: str, *fields: str) -> bytes:
    lines = [f"Authentication-Results: {f}" for f in fields]
    lines += [f"From: {sender}", "To: bot@example.net", "Subject: hi", "Message-ID: <a@x.example>"]
    return ("\r\n".join(lines) + "\r\n\r\nhello\r\n").encode()


# (name, From, fields top first, trusted ids configured,
#  the entry the doctor proposes (None: nothing to paste), verified once that entry is trusted)
CASES: list[tuple[str, str, list[str], list[str], str | None, bool | None]] = [
    ("no field", "ann@example.com", [], [], None, None),
    (
        "google pass",
        "ann@example.com",
        [f"{GOOGLE}; dkim=pass header.d=example.com; dmarc=pass header.from=example.com"],
        [GOOGLE],
        GOOGLE,
        True,
    ),
    (
        "microsoft id-less pass",
        "ann@example.com",
        [
            "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=example.com; dkim=pass "
            "(signature was verified) header.d=example.com;dmarc=pass action=none "
            "header.from=example.com;compauth=pass reason=100"
        ],
        [],
        "@none",
        True,
    ),
    (
        "microsoft id-less untrusted under google-only",
        "ann@example.com",
        ["spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com"],
        [GOOGLE],
        "@none",
        True,
    ),
    (
        "microsoft top says fail, planted google pass below",
        "ceo@example.com",
        [
            "spf=fail smtp.mailfrom=example.com; dmarc=fail action=oreject header.from=example.com",
            f"{GOOGLE}; dmarc=pass header.from=example.com",
        ],
        [GOOGLE, "@none"],
        "@none",
        False,
    ),
    (
        "planted trusted pass under a foreign top",
        "ceo@example.com",
        ["mx.evil.example; dmarc=none", f"{GOOGLE}; dmarc=pass header.from=example.com"],
        [GOOGLE],
        "mx.evil.example",
        None,
    ),
    (
        "trusted top says none, planted pass below",
        "ceo@example.com",
        [f"{GOOGLE}; dmarc=none", f"{GOOGLE}; dmarc=pass header.from=example.com"],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "id-less planted pass under an id-less top with nothing",
        "ceo@example.com",
        ["spf=none smtp.mailfrom=evil.example", "dmarc=pass header.from=example.com"],
        ["@none"],
        "@none",
        None,
    ),
    (
        "spf pass for a bounce subdomain (psl aligned)",
        "ann@example.com",
        [f"{GOOGLE}; spf=pass smtp.mailfrom=bounces@mail.example.com"],
        [GOOGLE],
        GOOGLE,
        True,
    ),
    (
        "dkim pass under co.uk, same registrable domain",
        "ann@example.co.uk",
        [f"{GOOGLE}; dkim=pass header.d=news.example.co.uk"],
        [GOOGLE],
        GOOGLE,
        True,
    ),
    (
        "dkim pass for another co.uk registrant",
        "ann@example.co.uk",
        [f"{GOOGLE}; dkim=pass header.d=evil.co.uk"],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "dkim pass for a neighbour under github.io",
        "ann@victim.github.io",
        [f"{GOOGLE}; dkim=pass header.d=attacker.github.io"],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "dmarc fail",
        "ceo@example.com",
        [f"{GOOGLE}; dmarc=fail (p=REJECT) header.from=example.com"],
        [GOOGLE],
        GOOGLE,
        False,
    ),
    (
        "dmarc stated twice",
        "ceo@example.com",
        [f"{GOOGLE}; dmarc=pass header.from=example.com; dmarc=pass header.from=example.com"],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "unreadable top (unterminated comment)",
        "ceo@example.com",
        [f"{GOOGLE}; dmarc=pass (oops header.from=example.com"],
        [GOOGLE],
        None,
        None,
    ),
    (
        "pass only inside a comment",
        "ceo@example.com",
        [f"{GOOGLE}; dmarc=none (dmarc=pass header.from=example.com) header.from=example.com"],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "echoed quoted envelope sender trying to add a clause",
        "ceo@example.com",
        [f'{GOOGLE}; spf=none smtp.mailfrom="x;dmarc=pass header.from=example.com"@evil.example'],
        [GOOGLE],
        GOOGLE,
        None,
    ),
    (
        "per-host id under a wildcard entry",
        "ann@example.com",
        ["mx3.messagingengine.com; dkim=pass header.d=example.com"],
        ["*.messagingengine.com"],
        "mx3.messagingengine.com",
        True,
    ),
    (
        "authserv-id with a version",
        "ann@example.com",
        ["MX.Example.NET 1; dmarc=pass header.from=example.com"],
        ["mx.example.net"],
        "mx.example.net",
        True,
    ),
    (
        "aligned dkim fail",
        "ceo@example.com",
        [f"{GOOGLE}; dkim=fail header.d=example.com; spf=softfail smtp.mailfrom=example.com"],
        [GOOGLE],
        GOOGLE,
        False,
    ),
]


async def _policy(tmp_path: Path, raw: bytes, mode: str, trusted: list[str]) -> tuple[str, object]:
    config = inbound_config(
        tmp_path, allowed_senders=["*"], sender_auth=mode, trusted_authserv_ids=trusted
    )
    outcome = await InboundPipeline(config, clock=lambda: ARRIVAL).process(raw, arrival=ARRIVAL)
    verified = outcome.message.sender_verified if outcome.message is not None else None
    return outcome.decision, verified


def test_twenty_header_sets() -> None:
    assert len(CASES) == 20


@pytest.mark.parametrize(
    ("sender", "fields", "trusted", "entry", "verified_once_trusted"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_doctor_and_policy_agree(
    tmp_path: Path,
    sender: str,
    fields: list[str],
    trusted: list[str],
    entry: str | None,
    verified_once_trusted: bool | None,
) -> None:
    raw = block(sender, *fields)
    reading = read_auth(raw, trusted)
    # The doctor's reading of this configuration is the policy's, under flag and enforce.
    decision, verified = await _policy(tmp_path, raw, "flag", trusted)
    assert decision == "deliver" and verified is reading.verified
    decision, _ = await _policy(tmp_path, raw, "enforce", trusted)
    assert decision == ("deliver" if reading.verified is True else "reject")
    # The entry it proposes is the topmost field's, and pasting it makes the policy
    # believe exactly that field.
    assert reading.entry == entry
    if entry is None:
        return
    pasted = [entry]
    after = read_auth(raw, pasted)
    assert after.trusted
    assert after.verified is verified_once_trusted
    assert (await _policy(tmp_path, raw, "flag", pasted))[1] is verified_once_trusted
    # With the line pasted, the doctor passes on this mail.
    config = inbound_config(tmp_path, sender_auth="enforce", trusted_authserv_ids=pasted)
    status, _, fix = judge_auth(config, [after])
    assert (status, fix) == ("pass", None)


def test_the_doctor_pastes_the_newest_mails_provider_field() -> None:
    microsoft = block(
        "ann@example.com",
        "spf=pass smtp.mailfrom=example.com; dmarc=pass action=none header.from=example.com",
        f"{GOOGLE}; dmarc=pass header.from=example.com",  # planted below: never proposed
    )
    older = block("bob@example.com", "mx.old.example; dmarc=pass header.from=example.com")
    config = inbound_config(Path("/nonexistent"), sender_auth="enforce", trusted_authserv_ids=[])
    readings = [read_auth(microsoft, []), read_auth(older, [])]
    status, detail, fix = judge_auth(config, readings)
    assert status == "fail"
    assert fix is not None and fix.endswith("paste: trusted_authserv_ids = ['@none']")
    assert "mx.google.com are ignored" in detail
    # Under "flag" the same finding is a warning, with the same line.
    flag = inbound_config(Path("/nonexistent"), sender_auth="flag", trusted_authserv_ids=[])
    status, _, fix2 = judge_auth(flag, readings)
    assert status == "warn" and fix2 == fix


def test_the_doctor_fails_enforce_with_nothing_to_learn_from() -> None:
    config = inbound_config(Path("/nonexistent"), sender_auth="enforce", trusted_authserv_ids=[])
    status, detail, fix = judge_auth(config, [])
    assert status == "fail" and "every allowed sender's mail is refused" in detail
    assert fix is not None and "sender_auth = 'flag'" in fix
    bare = read_auth(block("ann@example.com"), [])
    status, detail, fix = judge_auth(config, [bare])
    assert status == "fail" and "carries Authentication-Results" in detail
    assert fix is not None and "sender_auth = 'flag'" in fix


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.example.com", "example.com"),
        ("EXAMPLE.COM.", "example.com"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("x.github.io", "x.github.io"),
        ("co.uk", None),
        ("com", None),
    ],
)
def test_organizational_domain_from_the_bundled_list(domain: str, org: str | None) -> None:
    assert organizational_domain(domain) == org


def test_trust_line_is_valid_toml() -> None:
    import tomllib

    line = trust_line(["@none", "mx.google.com", "@none"])
    assert tomllib.loads(line) == {"trusted_authserv_ids": ["@none", "mx.google.com"]}
    assert provider_field([]) is None
