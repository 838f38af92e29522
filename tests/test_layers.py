"""The package's import graph has no circle: no two modules need each other, however lazily (function-level imports
count: a lazy import in a circle is the same knot, only hidden)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omnithought_dagster"


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("omnithought_dagster"):
                # `from pkg import submodule` depends on the submodule; `from module import name` on the module
                subs = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("omnithought_dagster")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The stages' domain packages sit below the project file and Dagster: each reads its own section (`<package>/settings.py`),
# never the assembled project file, the assets, checks, resources or the registry.
DOMAIN = ("seed", "llm", "teacher", "annotate", "curation", "train", "evaluation", "experiment", "models", "store")
ABOVE = ("config", "assets", "checks", "resources", "stages", "defs", "definitions", "demo", "cli", "sensors", "automation", "manifests")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    def under(module: str, packages: tuple[str, ...]) -> bool:
        return any(module == f"omnithought_dagster.{p}" or module.startswith(f"omnithought_dagster.{p}.") for p in packages)

    return sorted((module, dep) for module, deps in graph.items() if under(module, DOMAIN) for dep in deps if under(dep, ABOVE))


def test_nothing_in_a_stage_package_imports_upward():
    assert upward_imports(import_graph()) == []


def test_the_upward_finder_finds_one():
    graph = {
        "omnithought_dagster.seed.ingest": {"omnithought_dagster.config", "omnithought_dagster.ids"},
        "omnithought_dagster.config": set(),
    }
    assert upward_imports(graph) == [("omnithought_dagster.seed.ingest", "omnithought_dagster.config")]
