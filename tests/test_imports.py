"""The package's import graph: no cycles, and imports run one way (see docs/ARCHITECTURE.md).

Run as a script to print the graph: ``python tests/test_imports.py [-v]`` (exit 1 on a cycle).
Every ``import`` counts, function-level ones included: a cycle hidden inside a function is
still a cycle for the reader.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "raydefense"

# Layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = [
    ("base", ("raydefense.errors", "raydefense.storage", "raydefense.seeding", "raydefense.config",
              "raydefense.config_sections")),
    ("blocks", ("raydefense.models", "raydefense.attacks", "raydefense.gnr", "raydefense.denoise",
                "raydefense.distill", "raydefense.defenses", "raydefense.data", "raydefense.robust",
                # Wilson intervals and proportions: pure numbers, used by blocks and the report alike.
                "raydefense.report.stats")),
    # The report reads and writes a run's files (pipeline.run.RunLayout): it sits with the pipeline.
    ("application", ("raydefense.pipeline", "raydefense.tune", "raydefense.ablation", "raydefense.report",
                     "raydefense.export", "raydefense.serve", "raydefense.tracking")),
    ("entry", ("raydefense.cli", "raydefense.jobs_impl", "raydefense.__main__", "raydefense")),
]
# The upward edges kept: config validates model and attack names and the synthetic split plan
# when a config is loaded, by function-level imports of the registries and the split planner (neither
# imports config back), so that a bad name fails before anything runs.
ALLOWED_UPWARD = {("raydefense.config_sections", "raydefense.models"),
                  ("raydefense.config_sections", "raydefense.attacks"),
                  ("raydefense.config_sections", "raydefense.data.splits")}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of raydefense it imports`` (any level, any place in the file)."""
    mods = modules()

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                r = resolve(name)
                # A module importing its own package's __init__ is not an edge of interest.
                if r and r != m and not m.startswith(r + "."):
                    deps.add(r)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer of tests/test_imports.py"
    return level


def test_no_import_cycles():
    graph = import_graph()
    assert cycles(graph) == []


def test_imports_run_one_way():
    graph = import_graph()
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if layer_of(d) > layer_of(m) and (m, d) not in ALLOWED_UPWARD)
    assert upward == []


def test_building_blocks_import_no_ray():
    pattern_mods = [m for m in modules() if layer_of(m) <= 1]
    for m in pattern_mods:
        tree = ast.parse(modules()[m].read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{m} imports {names}"


if __name__ == "__main__":
    g = import_graph()
    if "-v" in sys.argv:
        for mod in sorted(g):
            print(mod, "->", ", ".join(sorted(g[mod])))
    found = cycles(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges, {len(found)} cycles")
    for comp in found:
        print("cycle:", "; ".join(f"{a} -> {b}" for a in comp for b in sorted(g[a]) if b in comp))
    sys.exit(1 if found else 0)
