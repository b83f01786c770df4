"""What a doctor run reports: one :class:`Check` per line, gathered in a :class:`DoctorReport`.

Apart from the checks themselves so that the OAuth checks (doctor/oauth.py) can
build report lines without importing the doctor that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """One line of the report. ``fix`` says what to change when it did not pass."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorReport:
    """All checks of one doctor run; ``exit_code`` is what ``prx-email doctor`` exits with."""

    checks: list[Check] = field(default_factory=list)
    config_path: str | None = None
    config_invalid: bool = False
    account: str | None = None  # the account's name, in a config with several

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.config_invalid and not self.failed

    @property
    def exit_code(self) -> int:
        """0 nothing failed (warnings allowed), 1 a check failed, 2 the config is invalid."""
        if self.config_invalid:
            return 2
        return 1 if self.failed else 0

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in Status.__args__}  # type: ignore[attr-defined]
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "config": self.config_path,
            **({"account": self.account} if self.account is not None else {}),
            "summary": counts,
            "checks": [c.to_dict() for c in self.checks],
        }
