#!/usr/bin/env python3
"""Import graph of the project's own packages: cycles and the longest import chain.

Reads the source with ``ast`` (nothing is imported), so it runs without the project's
dependencies. Used to check that the core imports no adapter and that no module circle exists.

    python scripts/import_graph.py [--packages spectdose service worker]
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The core's floor plan, top first: a module imports its own layer or those below, never above.
# Offline work (learning) sits above the pipeline it uses; the pipeline above its stages.
CORE_LAYERS = (
    ("spectdose.cli",),
    ("spectdose.learning",),
    ("spectdose.cycle", "spectdose.phantoms"),
    ("spectdose.pipeline",),
    ("spectdose.region_report",),
    ("spectdose",),  # the stages, dicom/, kernels/, cnn/ and the foundations (errors, constants, ...)
)


def core_layer(module: str) -> int | None:
    for i, prefixes in enumerate(CORE_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported by one file, at any depth in the file (lazy imports count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", nargs="+", default=["spectdose", "service", "worker"])
    args = parser.parse_args()
    files = {module_name(p): p for pkg in args.packages for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {name: imports_of(path, name, known) for name, path in files.items()}

    # Cycles: strongly connected components with more than one module (Tarjan).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strongconnect(v)

    in_cycle = {m for c in cycles for m in c}

    @cache
    def depth(v: str) -> int:
        return 1 + max((depth(w) for w in graph[v] if w not in in_cycle or v not in in_cycle), default=0)

    core_up = sorted(
        (a, b) for a, deps in graph.items() if a.startswith("spectdose") for b in deps if not b.startswith("spectdose")
    )
    print(f"modules: {len(graph)}, import edges: {sum(map(len, graph.values()))}")
    print(f"cycles: {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(c))
    print(f"core modules importing an adapter: {len(core_up)}")
    for a, b in core_up:
        print(f"  {a} -> {b}")
    upward = sorted(
        (a, b)
        for a, deps in graph.items()
        for b in deps
        if core_layer(a) is not None and core_layer(b) is not None and core_layer(b) < core_layer(a)
    )
    print(f"upward imports in the core: {len(upward)}")
    for a, b in upward:
        print(f"  {a} -> {b}")
    top = {(a.split(".")[0], b.split(".")[0]) for a, deps in graph.items() for b in deps}
    mutual = sorted({tuple(sorted(e)) for e in top if e[0] != e[1] and (e[1], e[0]) in top})
    print(f"packages importing each other: {len(mutual)}")
    for a, b in mutual:
        print(f"  {a} <-> {b}")
    deepest = max(graph, key=depth)
    print(f"import depth (longest chain, in modules): {depth(deepest)} (from {deepest})")
    return 1 if cycles or core_up or mutual or upward else 0


if __name__ == "__main__":
    raise SystemExit(main())
