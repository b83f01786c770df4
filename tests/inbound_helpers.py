"""Shared helpers for the inbound tests: a policy config and the corpus loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prx_channel_email.config import EmailConfig
from tests.config_builder import build_config

CORPUS = Path(__file__).parent / "corpus"
ARRIVAL = 1_700_000_000.0  # a fixed arrival time, so missing Date headers are predictable
BOT = "bot@example.net"


def inbound_config(tmp_path: Path, **overrides: Any) -> EmailConfig:
    """The config the corpus expectations were written for (IMAP/SMTP sides unused)."""
    fields: dict[str, Any] = {
        "username": "bot",
        "password": "unused-secret",
        "from_address": BOT,
        "allowed_senders": [
            "@example.com",
            "juergen@example.de",
            "@example.jp",
            "Ivan@Example.RU",
        ],
        "trusted_authserv_ids": ["mx.example.net"],
        "attachments_dir": tmp_path / "attachments",
        "max_attachment_bytes": 1000,
        "max_attachments_total_bytes": 4000,
    }
    fields.update(overrides)
    return build_config(tmp_path / "state", **fields)


def corpus_names() -> list[str]:
    return sorted(p.stem for p in CORPUS.glob("*.eml"))


def corpus_raw(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def corpus_expected(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CORPUS / f"{name}.json").read_text("utf-8"))
    return data


def outcome_fields(outcome: Any) -> dict[str, Any]:
    """An Outcome as the plain data the corpus .json files hold (paths become a flag)."""
    out: dict[str, Any] = {"decision": outcome.decision, "reason": outcome.reason}
    if outcome.message is not None:
        # Where it came from (account, folder) is stamped by the sync engine, not parsed.
        msg = outcome.message.model_dump(mode="json", exclude={"account", "folder"})
        msg["attachments"] = [
            {
                "filename": a["filename"],
                "content_type": a["content_type"],
                "size": a["size"],
                "saved": a["path"] is not None,
                "skipped_reason": a["skipped_reason"],
            }
            for a in msg["attachments"]
        ]
        out["message"] = msg
    else:
        out["id"] = outcome.message_id
    return out
