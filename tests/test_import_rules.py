"""The dependency rules hold: import-linter's contracts, and no import cycle at all.

The contracts live in pyproject.toml ([tool.importlinter]); CI runs `lint-imports`
as well, this runs the same check with the suite. The cycle count is separate
because a contract sees cycles between siblings only, not a package with one of
its own modules (``config`` <-> ``config.providers`` was one). grimp reads every
import statement, those inside functions and under TYPE_CHECKING included.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "prx_channel_email"


def _pyproject_contract(contract_id: str) -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract.get("id") == contract_id:
            return dict(contract)
    raise AssertionError(f"no import-linter contract {contract_id!r} in pyproject.toml")


def import_cycles(graph: grimp.ImportGraph, ignored: list[tuple[str, str]]) -> list[list[str]]:
    """Every strongly connected set of modules larger than one (each holds a cycle)."""
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    for importer, imported in ignored:
        edges.get(importer, set()).discard(imported)
    # Tarjan's algorithm, iterative (no recursion limit to worry about).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return sorted(found)


def _ignored_edges() -> list[tuple[str, str]]:
    """The acyclic contract's temporary exceptions (one list, in pyproject.toml)."""
    entries = _pyproject_contract("acyclic").get("ignore_imports", [])
    assert isinstance(entries, list)
    pairs = [tuple(part.strip() for part in str(e).split("->")) for e in entries]
    return [(a, b) for a, b in pairs]


def test_import_linter_contracts_are_kept() -> None:
    """`lint-imports` passes on this tree (it breaks on a layer skipped upward, on
    _mail importing the package, on a flow naming a storage backend)."""
    pytest.importorskip("importlinter")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))",
        ],
        cwd=ROOT,  # lint-imports puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    # The tree under test, not an installed copy somewhere else.
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and Path(spec.origin or "").resolve().parent == ROOT / PACKAGE
    cycles = import_cycles(graph, _ignored_edges())
    assert cycles == [], f"{len(cycles)} import cycle(s): {cycles}"


def test_the_cycle_count_sees_a_cycle_through_a_package_and_its_module() -> None:
    """The counter itself: it finds the shape the contracts miss, and honours an ignore."""
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("pkg.config", "pkg.config.providers"),
        ("pkg.config.providers", "pkg.config"),
        ("pkg.a", "pkg.b"),
        ("pkg.b", "pkg.c"),
        ("pkg.c", "pkg.a"),
        ("pkg.d", "pkg.a"),
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph, []) == [
        ["pkg.a", "pkg.b", "pkg.c"],
        ["pkg.config", "pkg.config.providers"],
    ]
    assert import_cycles(graph, [("pkg.config.providers", "pkg.config")]) == [
        ["pkg.a", "pkg.b", "pkg.c"]
    ]
