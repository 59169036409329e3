"""The package's internal imports form no cycle.

Every module of `hpqdeploy` is parsed (not imported); each `import` / `from ... import` naming a module of the
package is an edge, wherever it is written: at module level, in a function, under a condition. A name imported
from a package resolves to the submodule of that name when one exists, else to the package itself. Importing a
submodule is not counted as importing its parent packages (Python runs a package's `__init__` first, but a package
importing its own submodules is not a cycle between modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import hpqdeploy

ROOT = Path(hpqdeploy.__file__).resolve().parent


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> source file, for every module and package under the package directory `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owned(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or its closest enclosing module of the package (an attribute path such as `pkg.mod.func`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """Module -> {imported module of the package: line of the first such import}."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_owned(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _owned(base, modules))
            for target in targets:
                if target is not None and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not: strongly connected components of more than
    one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # the package has a few dozen modules: recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """A shortest cycle through the first module of each tangle, as [a, b, ..., a]."""
    return [_cycle_in(graph, set(c), c[0]) for c in tangles(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """A shortest cycle through `start` within its strongly connected component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    " + "\n    ".join(steps)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("import os\nimport pkg.b\n\ndef f():\n    from pkg.sub import c\n")
    (pkg / "b.py").write_text("from . import a\nfrom .sub.c import g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def g():\n    if True:\n        from ..b import x\n    import pkg.sub\n")
    graph = import_graph(pkg)
    assert {m: set(e) for m, e in graph.items()} == {
        "pkg": {"pkg.a"},  # a function imported from a module: an edge to the module
        "pkg.a": {"pkg.b", "pkg.sub.c"},  # module level and function level; os is not the package's
        "pkg.b": {"pkg.a", "pkg.sub.c"},  # relative imports
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.b", "pkg.sub"},  # nested in a function and a condition, relative to a subpackage
    }
    assert graph["pkg.a"]["pkg.sub.c"] == 5
    assert tangles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = tangles(graph)
    report = "".join(f"\n  {', '.join(group)} import each other, e.g.:{_describe(graph, cycle)}"
                     for group, cycle in zip(found, find_cycles(graph)))
    assert not found, "import cycles in hpqdeploy:" + report


def test_quantize_does_not_import_the_lowerings():
    """The fake-quant model does not depend on any runtime's lowering (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, hpqdeploy.core.quantize; "
            "print(sorted(m for m in sys.modules if m.startswith('hpqdeploy.lower')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
