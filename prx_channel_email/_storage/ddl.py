"""Splitting a DDL script into statements, for every backend's migrations; and the DDL
of steps both backends run word for word."""

from __future__ import annotations


def statements(script: str) -> list[str]:
    """The ``;``-separated statements of ``script`` (comment lines dropped first, so a
    ``;`` in a comment cannot split a statement)."""
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [s for s in code.split(";") if s.strip()]


#: Step ``ledger_refused``: the refused ledger rows by age, for ``prune_refused``. Partial
#: (only refused rows are in it): it costs handed-on mail nothing.
LEDGER_REFUSED_INDEX = (
    "CREATE INDEX IF NOT EXISTS ledger_refused ON ledger (account, received_at)"
    " WHERE outcome='rejected'"
)
