"""No import cycles inside ``deepshare_convert``, lazy (function-level) imports included.

The graph is built from the source with :mod:`ast` alone (nothing is imported): one node per
module of ``deepshare_convert/**/*.py``, one edge per ``import``/``from ... import`` of a package
module anywhere in a file -- at top level, inside functions, methods, ``try`` or ``if`` blocks --
with relative imports resolved against the importing module.  Counted as written, because a
function-level import only hides a cycle until the function runs.

Not counted: imports under ``if TYPE_CHECKING:`` (never executed) and ``importlib.import_module``
with a computed name (the package ``__init__``'s lazy attributes).

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "deepshare_convert"
ROOT = Path(__file__).resolve().parents[1]

# Library cycles that exist today, each the set of modules of one strongly connected component.
# Empty since the plan-kind registry (conversion/plan_kinds.py) broke rewrite <-> snl.
# The test fails on a cycle not listed here AND on a listed cycle that no longer exists, so this
# list can only shrink: delete an entry in the change that breaks its cycle.
KNOWN_CYCLES: set[frozenset[str]] = set()  # rewrite <-> snl went with the plan-kind registry (conversion/plan_kinds.py)


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``)."""
    mods = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any depth, skipping the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _known(name: str, mods) -> str | None:
    """``name`` or its nearest enclosing package module (``a.b.func`` -> ``a.b``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of its first import}."""
    mods = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        edges: dict[str, int] = {}
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(a.name, mods) for a in node.names]
            else:
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in mods else _known(source, mods))
            for target in targets:
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def describe(component: frozenset[str], graph: dict[str, dict[str, int]]) -> str:
    """One concrete cycle through ``component``, with the line of each import: a -> b (a.py:12) -> a."""
    start = min(component)
    # shortest path back to start inside the component (BFS)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in parents:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child in component and child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    path = [start]
    while True:
        path.append(parents[path[-1]])
        if path[-1] == start:
            break
    path.reverse()
    hops = [f"{a} -> {b} ({a.replace('.', '/')}.py:{graph[a][b]})" for a, b in zip(path, path[1:])]
    return f"{{{', '.join(sorted(component))}}}: " + "; ".join(hops)


def test_graph_sees_lazy_and_relative_imports():
    """The walker finds what it must: function-level imports, relative imports, ``from . import mod``."""
    graph = import_graph()
    assert "deepshare_convert.cli.mpc_commands" in graph["deepshare_convert.cli.app"]  # from . import mpc_commands
    assert "deepshare_convert.cli.loading" in graph["deepshare_convert.cli.app"]  # from .loading import ...
    assert "deepshare_convert.conversion.rewrite" in graph["deepshare_convert.cli.app"]  # inside a command body
    assert "deepshare_convert.models" in graph["deepshare_convert.model_or_out"]  # from .models (in a function)
    # the package __init__: ``inspect`` imports .conversion.census in its body; .rewrite only under TYPE_CHECKING
    assert "deepshare_convert.conversion.census" in graph["deepshare_convert"]
    assert "deepshare_convert.conversion.rewrite" not in graph["deepshare_convert"]


def test_cycle_finder_names_a_cycle(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(tmp_path)
    found = cycles(graph)
    assert found == [frozenset({f"{PACKAGE}.a", f"{PACKAGE}.sub.b"})]
    assert describe(found[0], graph) == (
        f"{{{PACKAGE}.a, {PACKAGE}.sub.b}}: {PACKAGE}.a -> {PACKAGE}.sub.b ({PACKAGE}/a.py:2); "
        f"{PACKAGE}.sub.b -> {PACKAGE}.a ({PACKAGE}/sub/b.py:1)"
    )


def test_no_new_import_cycles():
    """No import cycle among the package's modules, except the listed library ones (which must still exist)."""
    graph = import_graph()
    found = set(cycles(graph))
    new = sorted(describe(c, graph) for c in found - KNOWN_CYCLES)
    gone = sorted(", ".join(sorted(c)) for c in KNOWN_CYCLES - found)
    problems = [f"new import cycle {c}" for c in new]
    problems += [f"listed cycle {{{c}}} no longer exists: remove it from KNOWN_CYCLES" for c in gone]
    assert not problems, "\n".join(problems)


def test_cli_command_modules_do_not_import_the_entry_module():
    """cli/app.py is the one entry module: command modules share code through cli/loading.py etc., never via app."""
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("deepshare_convert.cli.") and name != "deepshare_convert.cli.reference":
            line = edges.get("deepshare_convert.cli.app")
            assert line is None, f"{name} imports cli.app (line {line})"
