"""The import graph follows the layers: common formats → model library → stages → CLI.

Every import is read from the source (module level and inside functions alike), so a lazy
import cannot hide an upward dependency or a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clipalign", "data_prep", "retrieval")

# Lower numbers are lower layers; a module may import its own layer or a lower one.
FORMATS, LIBRARY, STAGES, CLI, SCRIPTS = range(5)


def layer(module: str) -> int | None:
    if module == "clipalign.formats" or module.startswith("clipalign.formats."):
        return FORMATS
    if module in ("clipalign.cli", "clipalign.__main__") or module.startswith("clipalign.cli."):
        return CLI
    top = module.split(".")[0]
    if top == "clipalign":
        return LIBRARY
    if top in ("data_prep", "retrieval"):
        return STAGES
    if top == "scripts":
        return SCRIPTS
    return None  # third-party, the standard library, tests


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + list((ROOT / "scripts").glob("*.py"))
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules ``path`` imports; ``from pkg import sub`` counts as ``pkg.sub`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


MODULES = project_modules()
GRAPH = {name: imports_of(path, set(MODULES)) for name, path in MODULES.items()}


def test_the_walk_sees_every_layer():
    # The rules below are only as good as the graph: it must hold modules of every layer.
    assert {layer(m) for m in MODULES} == {FORMATS, LIBRARY, STAGES, CLI, SCRIPTS}
    assert "clipalign.formats.skips" in GRAPH["clipalign.data"]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if layer(b) is not None and layer(a) is not None and layer(b) > layer(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {a: {b for b in deps if b in graph and b != a} for a, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_the_checks_catch_what_they_are_for():
    bad = {"clipalign.formats.a": {"clipalign.model"}, "clipalign.model": {"clipalign.formats.a"},
           "data_prep.x": {"clipalign.cli.train", "numpy"}, "clipalign.cli.train": set()}
    assert upward_imports(bad) == [("clipalign.formats.a", "clipalign.model"), ("data_prep.x", "clipalign.cli.train")]
    assert import_cycles(bad) == [["clipalign.formats.a", "clipalign.model"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_reaches_up_a_layer(name):
    upward = [b for _, b in upward_imports({name: GRAPH[name]})]
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


def test_stages_do_not_import_each_other():
    crossing = sorted((a, b) for a, deps in GRAPH.items() for b in deps
                      if layer(a) == STAGES and layer(b) == STAGES and a.split(".")[0] != b.split(".")[0])
    assert not crossing


def test_nothing_imports_tests():
    offenders = sorted(a for a, deps in GRAPH.items() if any(d == "tests" or d.startswith("tests.") for d in deps))
    assert not offenders


def test_no_import_cycles():
    assert not import_cycles(GRAPH)
