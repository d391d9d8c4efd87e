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


def imports_in(source: str, module: str, known: set[str], *, package: bool = False) -> set[str]:
    """The modules ``source`` (the text of ``module``; ``package``: its ``__init__``) imports.

    ``from pkg import sub`` counts as ``pkg.sub`` when that is a module; a relative import is
    resolved against ``module``'s package, so it cannot hide an upward dependency.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if package else module.split(".")[:-1]
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{module}: a relative import above the top package")
                anchor = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules the file at ``path`` imports (see ``imports_in``)."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), known, package=path.name == "__init__.py")


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
    # Relative imports resolve to the modules they name, so they are checked like absolute ones.
    known = {"clipalign.cli", "clipalign.cli.train", "clipalign.formats", "clipalign.formats.a", "clipalign.model"}
    assert imports_in("from ..cli import train", "clipalign.formats.a", known) == {"clipalign.cli.train"}
    assert imports_in("from .. import model", "clipalign.formats.a", known) == {"clipalign.model"}
    assert imports_in("from . import a", "clipalign.formats", known, package=True) == {"clipalign.formats.a"}
    assert imports_in("from .a import x", "clipalign.formats", known, package=True) == {"clipalign.formats.a"}
    lazy = imports_in("def f():\n    from ..cli.train import main\n", "clipalign.formats.a", known)
    assert upward_imports({"clipalign.formats.a": lazy}) == [("clipalign.formats.a", "clipalign.cli.train")]
    with pytest.raises(AssertionError, match="above the top package"):
        imports_in("from ... import x", "clipalign.model", known)


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
