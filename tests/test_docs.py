"""The docs stay findable and complete: the README is a short page, and the generated
reference lists every configuration field (with a description), every error code,
every counter and every log event the source uses.

The expectations are read from the source with plain regular expressions, not with
the generator's own ``ast`` walk, so a generator that misses a kind of call fails
here instead of silently leaving it out. Building the site (``mkdocs build
--strict``) is CI's job; these checks need no mkdocs.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from prx_channel_email import __all__ as public_names
from prx_channel_email.config import EmailConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "prx_channel_email"
README = ROOT / "README.md"


@functools.cache
def _generator() -> ModuleType:
    """docs/_gen/reference.py, loaded once (it parses the whole package)."""
    path = ROOT / "docs" / "_gen" / "reference.py"
    spec = importlib.util.spec_from_file_location("prx_docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    generated: dict[str, str] = _generator().pages()
    return generated


def _source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")))


def test_readme_is_short_and_keeps_its_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert 'pip install -e ".[demo]" && prx-email demo' in text
    assert "bash tests/run.sh" in text


def test_every_config_field_has_a_description_in_the_reference(pages: dict[str, str]) -> None:
    page = pages["reference/configuration.md"]
    missing = [name for name, info in EmailConfig.model_fields.items() if not info.description]
    assert not missing, f"EmailConfig fields without Field(description=...): {missing}"
    for name, info in EmailConfig.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"{name} is not in the configuration reference"
        assert f"PRX_EMAIL_{name.upper()}" in row
        assert " ".join((info.description or "").split())[:40] in row.replace("\\|", "|")


def test_config_reference_shows_types_and_defaults(pages: dict[str, str]) -> None:
    rows = {
        line.split("`")[1]: line
        for line in pages["reference/configuration.md"].splitlines()
        if line.startswith("| `")
    }
    assert "**required**" in rows["imap_host"]
    assert "`993`" in rows["imap_port"] and "≤ 65535" in rows["imap_port"]
    assert '`"enforce"`' in rows["sender_auth"] and '`"flag"`' in rows["sender_auth"]
    assert "secret string" in rows["password"]


def test_every_error_code_is_in_the_reference(pages: dict[str, str]) -> None:
    page = pages["reference/errors.md"]
    source = _source()
    codes = set(re.findall(r'\bcode="([a-z][a-z0-9_]*)"', source))
    codes |= set(re.findall(r'(?m)^\s+code = "([a-z][a-z0-9_]*)"$', source))
    assert len(codes) > 60  # the pattern still finds them
    missing = sorted(c for c in codes if f"| `{c}` |" not in page)
    assert not missing, f"error codes missing from the generated reference: {missing}"
    # The policy's reasons, and codes computed by a helper (store.py's storage codes).
    for code in ("not_allowed", "unverified_sender", "storage_full", "storage_readonly"):
        assert f"| `{code}` |" in page
    for cls in ("ChannelError", "SendError", "StorageError", "OAuthReauthRequired"):
        assert cls in page


def test_every_log_event_and_counter_is_in_the_reference(pages: dict[str, str]) -> None:
    page = pages["reference/observability.md"]
    source = _source()
    events = set(re.findall(r'log_event\(\s*\w+,\s*[\w.]+,\s*"([a-z_]+\.[a-z_.]+)"', source))
    # Event names handed to the helpers that log them (self._log(logging.X, "name", ...)).
    events |= set(re.findall(r'self\._\w+\(\s*logging\.[A-Z]+,\s*"([a-z_]+\.[a-z_.]+)"', source))
    events |= set(re.findall(r'event = "([a-z_]+\.[a-z_.]+)"', source))
    assert len(events) > 40
    missing = sorted(e for e in events if f"| `{e}` |" not in page)
    assert not missing, f"log events missing from the generated reference: {missing}"
    counters = set(re.findall(r'metrics\.(?:inc|gauge)\(\s*"([a-z_.]+)"', source))
    assert len(counters) > 25
    missing = sorted(c for c in counters if f"| `{c}` |" not in page)
    assert not missing, f"counters missing from the generated reference: {missing}"
    # Names built at run time appear as patterns.
    assert "| `inbound.skipped.<reason>` |" in page
    assert "| `storage.faults.<code>` |" in page


def test_python_api_page_documents_every_export(pages: dict[str, str]) -> None:
    page = pages["reference/python-api.md"]
    for name in public_names:
        if name.startswith("__"):
            assert name in page
        else:
            assert f"::: prx_channel_email.{name}\n" in page


def test_every_nav_entry_exists() -> None:
    """A page named in mkdocs.yml's nav is on disk or generated (mkdocs would fail too,
    but only where the docs extra is installed)."""
    nav = re.findall(r"(?m)^\s+- (?:[^:\n]+: )?([\w/-]+\.md)$", (ROOT / "mkdocs.yml").read_text())
    generated = set(_generator().pages())
    assert len(nav) >= 20
    for page in nav:
        assert page in generated or (ROOT / "docs" / page).is_file(), page


def test_prometheus_names_map_counters_the_code_counts() -> None:
    """The /metrics tables name counters by their dotted names: each must be one the
    code counts (or the prefix of a family), or its metric would stay at zero."""
    generator = _generator()
    table = generator.prometheus_names()
    if not table:
        pytest.skip("no operations endpoint (prx_channel_email._ops.prometheus) in this tree")
    counted = [c.name for c in generator.counters()]
    for name in table:
        if name.endswith("."):
            assert any(c.startswith(name) for c in counted), name
        else:
            assert name in counted, f"{name} is mapped to a Prometheus metric but never counted"


def test_every_provider_row_is_in_the_reference(pages: dict[str, str]) -> None:
    from prx_channel_email.config.providers import PROVIDERS

    page = pages["reference/providers.md"]
    for row in PROVIDERS:
        assert f"| {row.label}" in page, row.key
        if row.imap is not None:
            assert f"`{row.imap.host}` {row.imap.port}" in page


def test_every_command_and_option_is_in_the_cli_reference(pages: dict[str, str]) -> None:
    import typer

    from prx_channel_email import cli

    page = pages["reference/cli.md"]
    group = typer.main.get_command(cli.app)
    seen = 0
    for path, command in _generator()._commands(group, ["prx-email"]):
        if getattr(command, "commands", None):
            continue
        seen += 1
        assert f"## `{' '.join(path)}`" in page
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert f"`{opt}" in page or f", {opt}" in page, (path, opt)
    assert seen >= 10
