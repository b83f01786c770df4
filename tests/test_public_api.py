"""The public surface is explicit: what ``__all__`` exports is what the docs' API
list (docs/guides/embedding.md) documents, and every exported error is a
ChannelError with a code."""

from __future__ import annotations

import re
from pathlib import Path

import prx_channel_email as pkg
from prx_channel_email import ChannelError

ROOT = Path(__file__).resolve().parent.parent
API_LIST = ROOT / "docs" / "guides" / "embedding.md"


def _api_section() -> str:
    text = API_LIST.read_text(encoding="utf-8")
    start = text.index("**The public API**")
    return text[start : text.index("\n\n", text.index("| name | what |", start))]


def test_every_export_is_importable_and_documented() -> None:
    documented = set(re.findall(r"`([A-Za-z_]+)", _api_section()))
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
        assert name in documented, f"{name} is exported but not in the API list of {API_LIST.name}"


def test_exported_errors_are_channel_errors_with_a_code() -> None:
    errors = [getattr(pkg, n) for n in pkg.__all__ if n.endswith("Error") or n.startswith("OAuth")]
    assert len(errors) >= 8
    for cls in errors:
        assert issubclass(cls, ChannelError), cls
        assert isinstance(cls.code, str) and cls.code, cls


def test_version_has_one_source() -> None:
    from prx_channel_email._version import __version__

    assert pkg.__version__ == __version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    # The only version line is the pointer to _version.py.
    assert re.findall(r"(?m)^version\s*=.*$", pyproject) == [
        'version = { attr = "prx_channel_email._version.__version__" }'
    ]
