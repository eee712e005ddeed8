"""The shape of the code: no import circle inside clipes/ (an import anywhere in a file counts, at the top or
inside a function), and no module past 400 lines (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "clipes"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module under clipes/ (a package is its __init__.py)."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the clipes modules it imports. ``from P import n`` is an edge to ``P.n`` when that is a
    module, else to ``P``; relative imports resolve against the importing module's package."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_circle_and_a_late_import(tmp_path):
    pkg = tmp_path / "clipes"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")  # inside a function: counts
    (pkg / "c.py").write_text("import clipes.a\n")
    mods = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = import_graph(mods)
    assert graph["clipes.c"] == {"clipes.a"}
    assert circles(graph) == [["clipes.a", "clipes.sub.b"]]


def test_no_import_circle_inside_clipes():
    assert circles(import_graph(_modules())) == []


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_module_over_400_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)}: {lines} lines; split it where a seam shows"


SEAMS = ("clipes.cams", "clipes.refiners", "clipes.tagging", "clipes.segment.encoders", "clipes.segment.heads")
CONDUCTOR = ("clipes.labeler", "clipes.run", "clipes.pipeline", "clipes.output", "clipes.cli")


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_layers_point_down():
    """docs/architecture.md: a seam never imports the conductor or the CLI, nothing but the CLI imports the CLI."""
    wrong = []
    for name, edges in import_graph(_modules()).items():
        for target in edges:
            if (_under(name, SEAMS) and _under(target, CONDUCTOR)) or \
                    (_under(target, ("clipes.cli",)) and not _under(name, ("clipes.cli", "clipes.__main__"))):
                wrong.append(f"{name} -> {target}")
    assert wrong == []
