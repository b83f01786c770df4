"""ImapSession against the real Dovecot: connection modes, errors a person can act on,
big FETCH responses, IDLE edge cases."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from prx_channel_email._net.imap import ImapSession, decode_mailbox, encode_mailbox, open_session
from prx_channel_email.errors import (
    AuthenticationError,
    FolderNotFoundError,
    InsecureConnectionError,
    TransportError,
)
from tests.fakes.pipeline import imap_config, mail
from tests.servers.dovecot import Account, DovecotServer
from tests.servers.proxy import TcpProxy


@pytest.mark.parametrize("security", ["tls", "starttls", "plain"])
async def test_connect_login_select_in_every_mode(
    dovecot: DovecotServer, account: Account, tmp_path: Path, security: str
) -> None:
    port = dovecot.imaps_port if security == "tls" else dovecot.imap_port
    config = imap_config(dovecot, account, tmp_path, port=port, imap_security=security)
    dovecot.deliver(account, mail(1))
    async with await open_session(config) as session:
        assert "Dovecot ready" in session.greeting
        assert session.has_idle
        assert "STARTTLS" not in session.capabilities or security == "plain"
        info = await session.select("INBOX")
        assert info.uidvalidity == dovecot.uidvalidity(account)
        assert info.uidnext == dovecot.uidnext(account)
        assert info.exists == 1


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_untrusted_certificate_has_its_own_code(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    unrelated_ca_file: Path,
    security: str,
) -> None:
    port = dovecot.imaps_port if security == "tls" else dovecot.imap_port
    config = imap_config(
        dovecot, account, tmp_path, port=port, imap_security=security, ca_file=unrelated_ca_file
    )
    with pytest.raises(TransportError) as info:
        await ImapSession.connect(config)
    assert info.value.code == "tls_verify_failed"
    assert str(port) in str(info.value)


async def test_plaintext_to_a_remote_host_is_refused_before_connecting(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, imap_security="plain")
    with pytest.raises(InsecureConnectionError):
        await ImapSession.connect(config, host="192.0.2.1", port=143)


async def test_refused_port_is_a_transport_error(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    from tests.servers.dovecot import free_ports

    config = imap_config(dovecot, account, tmp_path, port=free_ports(1)[0])
    with pytest.raises(TransportError) as info:
        await ImapSession.connect(config)
    assert info.value.code == "refused"


async def test_wrong_password_is_an_authentication_error_without_the_secret(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    config = imap_config(dovecot, account, tmp_path, password="not-the-password")
    session = await ImapSession.connect(config)
    try:
        with pytest.raises(AuthenticationError) as info:
            await session.login()
    finally:
        await session.logout()
    assert info.value.code == "auth_failed"
    assert "not-the-password" not in str(info.value)


async def test_password_with_quote_backslash_space_non_ascii_works_and_is_never_logged(
    dovecot: DovecotServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = 'p"a\\ss wörd'
    odd = dovecot.add_user(password=secret)
    caplog.set_level(logging.DEBUG)
    async with await open_session(imap_config(dovecot, odd, tmp_path)) as session:
        assert (await session.select("INBOX")).exists == 0
    logged = caplog.text
    assert secret not in logged and 'p\\"a' not in logged and "ss w" not in logged


async def test_missing_folder_lists_the_folders_that_exist(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    dovecot.create_folder(account, "Archive")
    async with await open_session(imap_config(dovecot, account, tmp_path)) as session:
        with pytest.raises(FolderNotFoundError) as info:
            await session.select("Inbox/Nope")
        assert "Archive" in info.value.folders and "INBOX" in info.value.folders
        assert "Archive" in str(info.value)
        # The session is still usable after the error.
        assert (await session.select("Archive")).exists == 0


async def test_folder_names_with_spaces_quotes_and_non_ascii(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    name = 'Kunden "A" Ärger'
    assert decode_mailbox(encode_mailbox(name)) == name
    async with await open_session(imap_config(dovecot, account, tmp_path)) as session:
        dovecot.create_folder(account, name)
        assert name in await session.list_folders()
        await session.append(name, mail(1))
        info = await session.select(name)
        assert info.exists == 1


async def test_append_to_the_special_use_sent_folder(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    dovecot.create_folder(account, "Sent")
    async with await open_session(imap_config(dovecot, account, tmp_path)) as session:
        sent = await session.find_special_use("\\Sent")
        assert sent == "Sent"
        assert await session.find_special_use("\\Flagged") is None
        await session.append(sent, mail(7))
    uid = dovecot.list_uids(account, "Sent")[0]
    assert dovecot.flags(account, "Sent", uid) == {"\\Seen"}
    assert b"<t-7@example.test>" in dovecot.fetch_raw(account, "Sent", uid)


async def test_one_fetch_of_hundreds_of_messages_does_not_overflow_the_parser(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    count = 800
    await asyncio.to_thread(lambda: [dovecot.deliver(account, mail(n)) for n in range(count)])
    async with await open_session(imap_config(dovecot, account, tmp_path)) as session:
        await session.select("INBOX")
        uids = await session.uid_search("ALL")
        assert len(uids) == count
        fetched = await session.uid_fetch(uids, "(UID RFC822.SIZE BODY.PEEK[HEADER])")
        assert sorted(fetched) == uids
        assert all(m.size and m.data and b"Message-ID" in m.data for m in fetched.values())
        bodies = await session.fetch_bodies(uids[:3])
        assert bodies[uids[0]].endswith(b"Hello number 0.\r\n")
    # Nothing was marked read by fetching.
    assert dovecot.flags(account, "INBOX", uids[0]) == set()


async def test_bye_during_idle_ends_the_wait_at_once(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    async with await open_session(imap_config(dovecot, account, tmp_path)) as session:
        await session.select("INBOX")
        await session.idle_start()
        await asyncio.to_thread(dovecot.kick, account)
        # aioimaplib alone would wait for the full IDLE timeout here.
        with pytest.raises(TransportError):
            await asyncio.wait_for(session.idle_wait(600), 10)
        assert not session.is_open


async def test_unanswered_done_on_a_frozen_link_times_out(
    dovecot: DovecotServer,
    account: Account,
    tmp_path: Path,
    proxy: Callable[[str, int], TcpProxy],
) -> None:
    link = proxy(dovecot.host, dovecot.imaps_port)
    config = imap_config(dovecot, account, tmp_path, host=link.host, port=link.port)
    session = await open_session(config)
    await session.select("INBOX")
    await session.idle_start()
    assert not await session.idle_wait(0.2)
    await asyncio.to_thread(link.freeze)
    with pytest.raises(TransportError) as info:
        await session.idle_done(1.0)
    assert info.value.code == "timeout"
    assert not session.is_open
    await session.logout()  # never raises, even on a dead session
