"""Splitting a DDL script into statements, for every backend's migrations."""

from __future__ import annotations


def statements(script: str) -> list[str]:
    """The ``;``-separated statements of ``script`` (comment lines dropped first, so a
    ``;`` in a comment cannot split a statement)."""
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [s for s in code.split(";") if s.strip()]
