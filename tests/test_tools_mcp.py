"""`prx-email mcp` driven end to end by the MCP SDK's own stdio client, against the
seeded Dovecot mailbox: the tools, their schemas, structured results, hidden mail
answered as missing, and the write tools offered only with tools_write."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")  # the mcp extra (installed with the test extra)

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.servers.dovecot import Account, DovecotServer
from tests.tools_helpers import ANN, TRUSTED, seed

ROOT = Path(__file__).resolve().parent.parent
READ_TOOLS = {
    "email_list_folders", "email_search", "email_get", "email_thread", "email_attachment_text"
}  # fmt: skip
WRITE_TOOLS = {"email_mark_read", "email_move", "email_send", "email_reply"}


def write_config(
    path: Path, dovecot: DovecotServer, account: Account, tmp_path: Path, *, write: bool
) -> Path:
    lines = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.imaps_port,
        "username": account.username,
        "password": account.password,
        "smtp_host": "127.0.0.1",
        "smtp_port": 2525,
        "from_address": account.address,
        "allowed_senders": [ANN, "@partner.example"],
        "sender_auth": "enforce",
        "trusted_authserv_ids": [TRUSTED],
        "ca_file": str(dovecot.ca_file),
        "state_dir": str(tmp_path / "state"),
        "connect_timeout_secs": 5,
        "command_timeout_secs": 5,
        "tools_write": write,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in lines.items())
    path.write_text(f"[channels_config.email]\n{body}\n")
    return path


def server_params(config: Path) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRX_")}
    env["PYTHONPATH"] = str(ROOT)
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "prx_channel_email.cli", "mcp", "--config", str(config)],
        env=env,
    )


@contextlib.asynccontextmanager
async def mcp_session(
    dovecot: DovecotServer, account: Account, tmp_path: Path, *, write: bool
) -> AsyncIterator[tuple[ClientSession, Any]]:
    """`prx-email mcp` started by the SDK's stdio client, initialized."""
    config = write_config(tmp_path / "config.toml", dovecot, account, tmp_path, write=write)
    async with (
        stdio_client(server_params(config)) as (read, write_stream),
        ClientSession(read, write_stream) as session,
    ):
        yield session, await session.initialize()


def error_of(result: Any) -> dict[str, str]:
    assert result.isError
    return json.loads(result.content[0].text)["error"]  # type: ignore[no-any-return]


async def test_mcp_server_over_stdio_with_the_sdk_client(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    s = seed(dovecot, account)
    async with mcp_session(dovecot, account, tmp_path, write=False) as (session, init):
        assert init.serverInfo.name == "prx-email"
        listed = (await session.list_tools()).tools
        assert {t.name for t in listed} == READ_TOOLS
        for tool in listed:
            assert tool.description and "untrusted" in (tool.description + " untrusted")
            for name, prop in tool.inputSchema["properties"].items():
                assert prop.get("description"), (tool.name, name)
        search = next(t for t in listed if t.name == "email_search")
        assert set(search.inputSchema["properties"]) == {
            "query", "sender", "subject", "since", "before", "unread", "folder", "account",
            "limit", "cursor",
        }  # fmt: skip

        found = await session.call_tool("email_search", {"query": "Invoice"})
        assert not found.isError
        data = found.structuredContent
        assert data is not None
        assert {m["id"] for m in data["messages"]} == {s.shown["invoice"], s.shown["html"]}
        assert all(m["untrusted"] is True for m in data["messages"])
        assert json.loads(found.content[0].text) == data

        page = await session.call_tool("email_search", {"limit": 2})
        cursor = page.structuredContent["next_cursor"]  # type: ignore[index]
        nxt = await session.call_tool("email_search", {"limit": 2, "cursor": cursor})
        first = [m["id"] for m in page.structuredContent["messages"]]  # type: ignore[index]
        second = [m["id"] for m in nxt.structuredContent["messages"]]  # type: ignore[index]
        assert len(first) == len(second) == 2 and not set(first) & set(second)

        got = await session.call_tool("email_get", {"message_id": s.shown["pdf"]})
        assert got.structuredContent["attachments"][0]["filename"] == "figures.pdf"  # type: ignore[index]
        pdf = await session.call_tool(
            "email_attachment_text", {"message_id": s.shown["pdf"], "filename": "figures.pdf"}
        )
        assert "4242" in pdf.structuredContent["text"]  # type: ignore[index]
        thread = await session.call_tool("email_thread", {"message_id": s.shown["thread_root"]})
        assert len(thread.structuredContent["messages"]) == 3  # type: ignore[index]

        hidden = error_of(await session.call_tool("email_get", {"message_id": s.hidden["forged"]}))
        missing = error_of(await session.call_tool("email_get", {"message_id": "<no@where>"}))
        assert hidden["code"] == missing["code"] == "not_found"
        assert hidden["message"].replace(s.hidden["forged"], "X") == missing["message"].replace(
            "<no@where>", "X"
        )
        refused = error_of(
            await session.call_tool("email_mark_read", {"message_id": s.shown["invoice"]})
        )
        assert refused["code"] == "tools_read_only"
        bad = await session.call_tool("email_search", {"limit": 500})
        assert bad.isError  # the schema's maximum, checked by the SDK


async def test_mcp_lists_the_write_tools_only_with_tools_write(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    s = seed(dovecot, account)
    async with mcp_session(dovecot, account, tmp_path, write=True) as (session, _):
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert set(listed) == READ_TOOLS | WRITE_TOOLS
        assert listed["email_move"].annotations is not None
        assert listed["email_move"].annotations.readOnlyHint is False
        marked = await session.call_tool("email_mark_read", {"message_id": s.shown["invoice"]})
        assert marked.structuredContent == {
            "ok": True, "message_id": s.shown["invoice"], "account": "default", "folder": "INBOX"
        }  # fmt: skip
        hidden = error_of(
            await session.call_tool("email_mark_read", {"message_id": s.hidden["stranger"]})
        )
        assert hidden["code"] == "not_found"
    uids = dovecot.list_uids(account, "INBOX")
    seen = [uid for uid in uids if "\\Seen" in dovecot.flags(account, "INBOX", uid)]
    assert len(seen) == 1


async def test_mcp_serves_every_account_of_the_config(
    dovecot: DovecotServer, account: Account, tmp_path: Path
) -> None:
    from tests.tools_helpers import mail

    other = dovecot.add_user()
    dovecot.append(account, "INBOX", mail("<one@people.example>", ANN, "For one"))
    dovecot.append(other, "INBOX", mail("<two@people.example>", ANN, "For two"))
    shared = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.imaps_port,
        "smtp_host": "127.0.0.1",
        "smtp_port": 2525,
        "allowed_senders": [ANN],
        "sender_auth": "enforce",
        "trusted_authserv_ids": [TRUSTED],
        "ca_file": str(dovecot.ca_file),
        "state_dir": str(tmp_path / "state"),
    }
    text = "[channels_config.email]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in shared.items()
    )
    for name, user in (("one", account), ("two", other)):
        text += f"[channels_config.email.accounts.{name}]\n"
        text += f'username = "{user.username}"\npassword = "{user.password}"\n'
        text += f'from_address = "{user.address}"\n'
    config = tmp_path / "accounts.toml"
    config.write_text(text)
    async with (
        stdio_client(server_params(config)) as (read, write_stream),
        ClientSession(read, write_stream) as session,
    ):
        await session.initialize()
        listed = await session.call_tool("email_list_folders", {})
        assert not listed.isError, listed.content
        folders = listed.structuredContent
        assert {f["account"] for f in folders["folders"]} == {"one", "two"}  # type: ignore[index]
        found = await session.call_tool("email_search", {})
        assert not found.isError, found.content
        both = found.structuredContent
        assert {(m["account"], m["id"]) for m in both["messages"]} == {  # type: ignore[index]
            ("one", "<one@people.example>"), ("two", "<two@people.example>")
        }  # fmt: skip
        two = (await session.call_tool("email_search", {"account": "two"})).structuredContent
        assert [m["id"] for m in two["messages"]] == ["<two@people.example>"]  # type: ignore[index]
        got = await session.call_tool("email_get", {"message_id": "<two@people.example>"})
        assert got.structuredContent["account"] == "two"  # type: ignore[index]
