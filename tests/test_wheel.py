"""What users install is whole: the built wheel holds every module of the source tree,
and every module imports from a normal (non-editable) install.

The main suite runs from the checkout, where a module missing from the wheel goes
unnoticed (the last wave's ``integrations/`` did). So the first test builds the wheel
itself and compares. ``tests/run.sh`` then installs that wheel into a fresh virtualenv
and runs this file and the host-integration tests from a copy of ``tests/`` with no
source tree beside it (``PRX_TEST_INSTALLED=1``): there the other tests prove the
installed package, not the checkout, is the one that works.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prx_channel_email

INSTALLED = os.environ.get("PRX_TEST_INSTALLED") == "1"
# Where the source tree is: beside this file, or (installed mode) named by run.sh.
SOURCE = Path(os.environ.get("PRX_SOURCE_ROOT") or Path(__file__).resolve().parents[1])
PACKAGE_DIR = SOURCE / "prx_channel_email"


def _source_files() -> set[str]:
    """Every file of the package a user needs: modules and the typing marker."""
    return {
        p.relative_to(SOURCE).as_posix()
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel run.sh built (``PRX_WHEEL``), else one built here from the source tree."""
    given = os.environ.get("PRX_WHEEL")
    if given:
        return Path(given)
    if not PACKAGE_DIR.is_dir():
        pytest.fail(f"no source tree at {SOURCE} to build a wheel from (set PRX_SOURCE_ROOT)")
    # Built from a clean copy: setuptools reuses a stale build/ directory of the
    # checkout, which would ship modules the package list no longer names.
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(SOURCE / name, tree / name)
    shutil.copytree(PACKAGE_DIR, tree / "prx_channel_email",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("prx_channel_email-*.whl")
    return built


def test_wheel_holds_every_module_of_the_source_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("prx_channel_email/")}
    missing = sorted(_source_files() - shipped)
    assert not missing, f"the wheel {wheel.name} lacks {missing}"
    assert "prx_channel_email/py.typed" in shipped


def test_wheel_declares_the_hermes_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (ep_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep_name).decode()
    assert "[hermes_agent.plugins]" in entry_points
    assert "prx_email = prx_channel_email.integrations.hermes" in entry_points


def test_every_module_imports_from_the_installed_package() -> None:
    if INSTALLED:
        # The package must come from site-packages, not from a source tree on sys.path.
        here = Path(prx_channel_email.__file__).resolve()
        assert "site-packages" in here.parts, here
    walk = pkgutil.walk_packages(prx_channel_email.__path__, "prx_channel_email.")
    names = [m.name for m in walk]
    optional = {"prx_channel_email.integrations.nanobot": "nanobot",
                "prx_channel_email.integrations.hermes": "gateway"}  # fmt: skip
    failed = {}
    for name in names:
        host = optional.get(name)
        if host and importlib.util.find_spec(host) is None and not INSTALLED:
            continue  # that host's extra is not installed here (run.sh installs it)
        try:
            importlib.import_module(name)
        except Exception as exc:  # pragma: no cover - the assertion names it
            failed[name] = repr(exc)
    assert not failed, failed
    # The subpackages a flat ``packages = [...]`` list once left out.
    for sub in ("integrations", "_mail", "_inbound", "_outbound", "_storage", "_net", "_oauth"):
        assert f"prx_channel_email.{sub}" in names


@pytest.mark.skipif(not INSTALLED, reason="checks the wheel install (run.sh's wheel stage)")
def test_hosts_find_the_integrations_in_the_install() -> None:
    from prx_channel_email.integrations.nanobot import PrxEmailChannel

    assert PrxEmailChannel.name == "prx_email"
    (ep,) = [e for e in importlib.metadata.entry_points(group="hermes_agent.plugins")
             if e.name == "prx_email"]  # fmt: skip
    plugin = ep.load()
    assert callable(plugin.register)
