"""The structure of the source, checked from its text with the standard library's `ast`.

- No import circle: no module imports (directly or through others, at module level or inside a
  function) a module that imports it.
- Passes stay thin: the modules in `passes/` average under 150 lines; numerics live in qcompiler/.
- A pass never imports another pass's module.
- Every `node.meta` key the source reads or writes is declared in `qcompiler/meta.py`.
- Backends are reached through the table: nothing outside `qcompiler/backends/` imports a backend
  module.

Run it as a script to print the import graph's summary: `python tests/test_architecture.py`.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each installs as (pyproject.toml's package-dir).
PACKAGES = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes", "qcompiler.targets": ROOT / "targets"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _resolve(current: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> nx.DiGraph:
    """Module -> the internal modules it imports (every import statement, wherever it stands)."""
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                # `import qcompiler.x.y` names the module itself; a name inside a module names that module.
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph.add_edge(name, t)
    return graph


def circles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert graph.number_of_edges() > 50          # the graph was read at all
    assert circles(graph) == []


def test_passes_are_thin_and_never_import_each_other():
    graph = import_graph()
    passes = [m for m in modules() if m.startswith("qcompiler.passes.")]
    lines = [len(modules()[m].read_text(encoding="utf-8").splitlines()) for m in passes]
    assert len(passes) >= 13
    assert sum(lines) / len(lines) < 150, dict(zip(passes, lines))
    for m in passes:
        assert not [t for t in graph.successors(m) if t.startswith("qcompiler.passes")], m


def test_only_the_backend_table_imports_backends():
    graph = import_graph()
    for src, dst in graph.edges:
        if dst.startswith("qcompiler.backends.") and not src.startswith("qcompiler.backends"):
            raise AssertionError(f"{src} imports {dst}; go through qcompiler.backends (lower/export)")


_META = re.compile(r"""\bmeta(?:\[|\.get\(|\.setdefault\(|\.pop\()\s*["']([A-Za-z_]+)["']""")


def test_every_node_meta_key_is_declared():
    from qcompiler.meta import GRAPH_META, NODE_META

    declared = {k.name for k in NODE_META + GRAPH_META} | {"tensor_meta", "nn_module_stack", "stack_trace"}
    used = set()
    for path in modules().values():
        used |= set(_META.findall(path.read_text(encoding="utf-8")))
    assert used, "no meta key found: the pattern is broken"
    assert used - declared == set()


if __name__ == "__main__":
    g = import_graph()
    print(f"{g.number_of_nodes()} modules, {g.number_of_edges()} imports, circles: {circles(g) or 'none'}")
    for m in sorted(m for m in modules() if m.startswith("qcompiler.passes.")):
        print(f"{m}: {len(modules()[m].read_text().splitlines())} lines")
    sys.exit(1 if circles(g) else 0)
