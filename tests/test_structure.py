"""The package's import graph has no cycle, between modules and between subpackages, counting
every import that runs (top level and inside functions; ``if TYPE_CHECKING:`` blocks run none)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import dit_mem

ROOT = Path(dit_mem.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (``from pkg import submodule``: the submodule)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                names = [a.name for a in node.names if f"{base}.{a.name}" not in mods]
                targets = subs + ([base] if names else [])
            else:
                continue
            for target in targets:
                found = owner(target) if target.startswith("dit_mem") else None
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    nodes = sorted(set(graph) | {n for targets in graph.values() for n in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])  # dit_mem.bank.build → dit_mem.bank


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert "dit_mem.pipeline" in graph["dit_mem.generation"]  # inside a function
    assert "dit_mem.checkpoint" in graph["dit_mem.training.trainer"]  # from pkg import module
    assert "dit_mem.backbone.injection" not in graph["dit_mem.backbone.families.base"]  # typing
    assert len(graph) > 80


@pytest.mark.parametrize("level", ["module", "subpackage"])
def test_import_graph_has_no_cycle(level):
    graph = import_graph()
    if level == "subpackage":
        grouped: dict[str, set[str]] = defaultdict(set)
        for source, targets in graph.items():
            grouped[subpackage(source)] |= {subpackage(t) for t in targets} - {subpackage(source)}
        graph = grouped
    found = cycles(graph)
    edges = [f"{a} -> {b}" for c in found for a in c for b in sorted(graph[a]) if b in c]
    assert not found, "import cycles:\n" + "\n".join(edges)


def test_no_function_over_80_lines():
    """Long units are where two routes of one job hide: every function stays readable whole."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_a_family_is_a_few_small_parts_each_read_by_its_consumers():
    """A family is its classes and four parts; the latent and training code read only their
    part (what the attention sees stays in the backbone)."""
    import dataclasses

    from dit_mem.backbone.families import base, families

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    sizes = {p.__name__: len(public(p)) for p in (base.Injection, base.LatentSpace)}
    sizes |= {p.__name__: len(public(p)) for p in (base.Training, base.Generation)}
    assert sizes == {"Injection": 14, "LatentSpace": 8, "Training": 12, "Generation": 3}
    for family in families():
        fields = {f.name for f in dataclasses.fields(family)}
        assert {"injection", "latents", "training", "generation"} <= fields
        assert len(fields) == 6
    for package in ("data", "training", "bank", "retrieval", "evaluation", "commands"):
        for path in (ROOT / package).rglob("*.py"):
            assert "family.injection" not in path.read_text(), path
