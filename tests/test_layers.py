"""The layers of tessera, enforced: import-linter's contract from pyproject.toml, no import cycles
between files, and docs/ARCHITECTURE.md kept true (its layer list and its table of where each
paper's method lives)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import grimp
import networkx as nx
import pytest
from importlinter import cli as importlinter_cli

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tessera"
ARCH = ROOT / "docs" / "ARCHITECTURE.md"


def _layers() -> list[list[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in cfg["contracts"] if c["id"] == "layers"]
    return [[m.strip() for m in re.split(r"[:|]", line)] for line in contract["layers"]]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("tessera", cache_dir=None)


def test_import_linter_contracts_hold(capsys):
    code = importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, "import-linter found a layering break:\n" + capsys.readouterr().out[-4000:]


def test_every_area_sits_in_a_layer():
    """A new top-level module or area has to be placed in a layer, or the contract would not see it."""
    placed = {m for line in _layers() for m in line}
    top = {f"tessera.{p.stem}" for p in SRC.glob("*.py") if p.stem != "__init__"}
    top |= {f"tessera.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert top - placed == set(), f"place these in a layer in pyproject.toml: {sorted(top - placed)}"


def test_no_import_cycles_between_files(graph):
    """Counting imports inside functions: two files that import each other are one file in two pieces."""
    g = nx.DiGraph()
    for m in graph.modules:
        for t in graph.find_modules_directly_imported_by(m):
            g.add_edge(m, t)
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_nothing_imports_the_cli(graph):
    assert graph.find_modules_that_directly_import("tessera.cli") == set()


def _arch_text() -> str:
    assert ARCH.is_file(), "docs/ARCHITECTURE.md is the map of the layers and methods"
    return ARCH.read_text()


def test_architecture_page_lists_the_enforced_layers():
    """The ```layers block of docs/ARCHITECTURE.md is the contract's list, top to bottom."""
    block = re.search(r"```layers\n(.*?)```", _arch_text(), re.S)
    assert block, "docs/ARCHITECTURE.md needs a ```layers block"
    lines = [ln.split("#")[0] for ln in block.group(1).splitlines()]
    drawn = [sorted(m.strip() for m in re.split(r"[:|]", ln)) for ln in lines if ln.strip()]
    assert drawn == [sorted(line) for line in _layers()]


def _defined(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def test_architecture_method_table_points_at_real_code():
    """Every row of the method table names a file under src/tessera and functions or classes defined in it."""
    rows = re.findall(r"^\|[^|\n]+\|\s*`(src/tessera/[^`]+\.py)`\s*\|([^|\n]+)\|", _arch_text(), re.M)
    assert len(rows) >= 9, "one row per paper at least"
    for file, names in rows:
        path = ROOT / file
        assert path.is_file(), f"{file} (docs/ARCHITECTURE.md) does not exist"
        missing = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", names)) - _defined(path)
        assert not missing, f"docs/ARCHITECTURE.md: {sorted(missing)} not defined in {file}"
