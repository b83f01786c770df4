"""Tests a mutation audit (issue 23, item 13) found missing: each fails on the
single realistic mutation named in its docstring."""

from __future__ import annotations

import email
from pathlib import Path

from prx_channel_email import RejectedMessage
from prx_channel_email._inbound.pipeline import InboundPipeline
from prx_channel_email._mail.authresults import authserv_id_trusted, verdict
from prx_channel_email._mail.charsets import decode_words
from prx_channel_email._oauth.tokens import TokenManager
from prx_channel_email._outbound.compose import Parent, compose
from prx_channel_email.models import SendMessage
from tests.fakes.pipeline import mail, mid
from tests.inbound_helpers import inbound_config
from tests.outbound_helpers import ANN, seed_ledger, smtp_config
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.oauth_server import OAuthServer
from tests.servers.smtp import SmtpServer
from tests.test_host_senders import ALICE, EVE, config, listening
from tests.test_oauth_hostile import token_config
from tests.test_outbox import running_outbox


def test_a_wildcard_trusted_id_never_matches_a_look_alike_suffix() -> None:
    """Mutation: ``*.example.net`` compared without its dot (``evilexample.net``
    passes). That matters where the provider does not prepend its own field."""
    trusted = ["*.example.net"]
    assert authserv_id_trusted("mx1.example.net", trusted)
    for other in ("evilexample.net", "example.net.evil", "mx.evilexample.net", "xexample.net"):
        assert not authserv_id_trusted(other, trusted), other
    field = "evilexample.net; dmarc=pass header.from=example.com"
    assert verdict([field], "ceo@example.com", trusted).verified is None


async def test_the_access_token_is_refreshed_a_margin_before_it_expires(
    tmp_path: Path, oauth_server: OAuthServer
) -> None:
    """Mutation: the cached token used until its exact expiry (no margin); the
    refused-token retry hid it, at the cost of one failed login an hour."""
    now = [1_000_000.0]
    manager = TokenManager(token_config(tmp_path, oauth_server), clock=lambda: now[0])
    first = await manager.token()
    assert first.expires_at is not None and oauth_server.token_requests["refresh_token"] == 1
    now[0] = first.expires_at - 600  # well before the margin: the cache answers
    assert (await manager.token()).value == first.value
    now[0] = first.expires_at - 60  # still valid, but within the margin: refreshed
    second = await manager.token()
    assert second.value != first.value and second.fresh
    assert oauth_server.token_requests["refresh_token"] == 2


async def test_a_strangers_mail_with_our_address_as_reply_to_is_refused_not_quarantined(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    """Mutation: Reply-To pointing at us quarantines whoever sent it. For a stranger
    it must be a refusal, so the host hears of it (on_rejected); an allowed sender's
    such mail is quarantined (kept findable) and the host is not told."""
    async with listening(config(dovecot, account, tmp_path, allowed_senders=[ALICE])) as run:
        for n, sender in ((1, EVE), (2, ALICE)):
            raw = mail(n, sender=sender).replace(
                b"Subject:", f"Reply-To: {account.address}\r\nSubject:".encode(), 1
            )
            await dovecot.adeliver(account, raw)
        await dovecot.adeliver(account, mail(3, sender=ALICE))
        assert (await run.next()).id == mid(3)
        event: RejectedMessage = await run.next_rejected()
        assert (event.id, event.sender, event.reason) == (mid(1), EVE, "own_mail")
        assert run.rejected.empty()  # alice's was quarantined, not refused
        assert run.channel.metrics.get("inbound.quarantined") == 1


async def test_a_reply_by_recipient_alone_threads_onto_mail_whose_reply_target_it_is(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Mutation: the recipient-only lookup matches senders only. A list or a
    secretary writes From one address with Reply-To another; the answer to that
    other address belongs in the same thread."""
    config = smtp_config(tmp_path, smtp_server)
    bob = "bob@people.example"
    async with running_outbox(config) as outbox:
        await seed_ledger(outbox.store, config, message_id="<via-ann@p.example>", sender=ANN,
                          reply_target=bob, subject="Minutes", received_at=2000)  # fmt: skip
        await seed_ledger(outbox.store, config, message_id="<older-bob@p.example>", sender=bob,
                          subject="Older", received_at=1000)  # fmt: skip
        await outbox.send(SendMessage(content="noted", recipient=bob))
    sent = smtp_server.messages[0].message()
    assert sent["In-Reply-To"] == "<via-ann@p.example>"
    assert sent["Subject"] == "Re: Minutes"
    assert [r.lower() for r in smtp_server.messages[0].rcpt_tos] == [bob]


def cr_mail(from_: str, subject: str) -> bytes:
    return (
        f"From: {from_}\r\nTo: bot@example.net\r\nSubject: {subject}\r\n"
        "Message-ID: <cr@example.com>\r\n\r\nbody\r\n"
    ).encode()


async def test_a_bare_cr_in_a_subject_neither_survives_nor_makes_a_field(tmp_path: Path) -> None:
    """Mutation: header values keep a bare CR. Some readers take it for a line end,
    so ``hi\rBcc: x`` could become a field of its own, in our reply too."""
    pipeline = InboundPipeline(inbound_config(tmp_path, allowed_senders=["*"],
                                              sender_auth="off"))  # fmt: skip
    outcome = await pipeline.process(
        cr_mail("Anna <anna@example.com>", "hello\rBcc: victim@example.org")
    )
    assert outcome.decision == "deliver", outcome
    message = outcome.message
    assert message is not None and "\r" not in message.subject
    assert message.subject.startswith("hello")
    parent = Parent(message.id, message.subject, list(message.references))
    wire = compose(inbound_config(tmp_path), content="answer", recipient=message.reply_target,
                   parent=parent).raw  # fmt: skip
    assert email.message_from_bytes(wire)["Bcc"] is None
    assert b"\r" not in wire.replace(b"\r\n", b"")
    # The second guard, for a value that reaches the decoder with its CR (an encoded
    # word, a parser that does not split there): the CR becomes a space.
    assert decode_words("hello\rBcc: victim@example.org") == "hello Bcc: victim@example.org"
    assert decode_words("=?utf-8?q?hello=0DBcc=3A_x?=") == "hello Bcc: x"


async def test_a_bare_cr_in_the_from_field_is_no_readable_sender(tmp_path: Path) -> None:
    """A From that a bare CR could split is not read as anyone's: refused, never
    handed on under a name it may not have."""
    pipeline = InboundPipeline(inbound_config(tmp_path, allowed_senders=["*"],
                                              sender_auth="off"))  # fmt: skip
    outcome = await pipeline.process(
        cr_mail("Anna\rBcc: victim@example.org <anna@example.com>", "hello")
    )
    assert outcome.decision == "reject" and outcome.message is None
