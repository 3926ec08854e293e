"""The package's import structure: every module imports, no two modules import each other (at module or function
level, so an import hidden inside a function does not hide a cycle), and no package reaches into another's
private names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "tunelab"


def module_files() -> dict[str, Path]:
    """Every tunelab module by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported tunelab module, imported name or None, line) for every import anywhere in the file, functions
    included. ``from tunelab.x import y`` counts as importing the module tunelab.x.y when there is one."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "tunelab"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the package this module is in
                base = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([module] if module else []))
            if module.split(".")[0] != "tunelab":
                continue
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((sub, None, node.lineno) if sub in known else (module, a.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for target, _, _ in imports_of(m, f, set(files)):
            while target and target not in files:  # `import tunelab.x.y.z` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one path ``[a, b, ..., a]`` per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(sorted(c), graph) for c in components]


def _path_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself (breadth first, inside the component)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component + [start]


def test_cycle_finder_finds_direct_and_longer_cycles():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a", "c"}}
    assert sorted(cycles(graph)) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(module_files()))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "tunelab modules that import each other (move the shared part into the lower one):\n" + \
        "\n".join(" -> ".join(c) for c in found)


def _area(module: str) -> str:
    """The package a module belongs to (tunelab.run.stages -> tunelab.run); a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def test_no_package_imports_another_packages_private_names():
    files = module_files()
    bad = []
    for m, f in files.items():
        for target, name, line in imports_of(m, f, set(files)):
            private = [p for p in (target.split(".") + [name or ""]) if p.startswith("_") and not p.startswith("__")]
            if private and _area(target) != _area(m):
                bad.append(f"{f.relative_to(ROOT)}:{line}: {target}" + (f" import {name}" if name else ""))
    assert not bad, "private names imported across packages (make them public where they belong):\n" + \
        "\n".join(bad)


# The layers of docs/architecture.md, bottom up: a package may import its own layer's foundations and anything
# below it, never above. Each package's `command` module is the CLI layer (console, options) over its library.
LAYERS = [
    {"tunelab", "tunelab.errors", "tunelab.textfiles", "tunelab.config", "tunelab.results", "tunelab.stats"},
    {"tunelab.data"},
    {"tunelab.prompts", "tunelab.models", "tunelab.report"},
    {"tunelab.evaluate"},
    {"tunelab.generate", "tunelab.train", "tunelab.serve", "tunelab.vocab"},
    {"tunelab.run"},
]
CLI = {"tunelab.cli", "tunelab.console", "tunelab.options"}


def _layer(area: str) -> int:
    return next(i for i, group in enumerate(LAYERS) if area in group)


def test_packages_import_only_their_layer_and_below():
    """A newcomer adding a module sees where it may reach: the library never imports the CLI, and a lower layer
    never imports a higher one (e.g. evaluate never imports train; report knows no result types)."""
    files = module_files()
    bad = []
    for m, f in files.items():
        src = _area(m)
        is_command = m.endswith(".command") or src in CLI
        for target, _, line in imports_of(m, f, set(files)):
            dst = _area(target)
            if dst in CLI:
                ok = is_command
            elif src in CLI:
                ok = True
            else:
                ok = src == dst or _layer(dst) < _layer(src) or (_layer(dst) == _layer(src) == 0) \
                    or (is_command and _layer(dst) <= _layer(src))
            if not ok:
                bad.append(f"{f.relative_to(ROOT)}:{line}: {src} imports {dst}")
    assert not bad, "imports against the layers of docs/architecture.md:\n" + "\n".join(bad)
