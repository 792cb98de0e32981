"""The layering of DESIGN.md, checked on the source: a package imports only from the packages
before it (data → models → attacks → defenses → certify → train → backdoors → transfer →
explain → studies → report → cli), and from the top-level helpers (errors, atomic, stats,
variables, plugins) that every layer shares."""

from __future__ import annotations

import ast
from pathlib import Path

import robust_transfer

# certify (randomized smoothing) needs only models and attacks, and grids certify the models
# they fine-tune (transfer/), so it sits right after defenses.
LAYERS = ("data", "models", "attacks", "defenses", "certify", "train", "backdoors", "transfer",
          "explain", "studies", "report", "cli")
SHARED = {"errors", "atomic", "stats", "variables", "plugins"}
ROOT = Path(robust_transfer.__file__).parent


def _imported(tree: ast.AST) -> set[str]:
    """The robust_transfer subpackages / modules a module imports (anywhere in it)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for m in modules:
            parts = m.split(".")
            if parts[0] == "robust_transfer" and len(parts) > 1:
                names.add(parts[1])
    return names


def test_every_package_imports_only_from_the_layers_before_it():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) < 2:  # top-level modules: the shared helpers and __init__
            continue
        layer = rel.parts[0]
        assert layer in LAYERS, f"{rel}: package {layer!r} is not in DESIGN.md's layers"
        allowed = set(LAYERS[: LAYERS.index(layer) + 1]) | SHARED
        for name in _imported(ast.parse(path.read_text())) - allowed:
            violations.append(f"{rel} imports robust_transfer.{name}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_a_violation():
    tree = ast.parse("from robust_transfer.report.study import make_report\n"
                     "import robust_transfer.transfer.grid\n")
    assert _imported(tree) == {"report", "transfer"}


def _module_names() -> dict[str, Path]:
    """Every robust_transfer module by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("robust_transfer",) + path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_edges(name: str, tree: ast.AST, modules: set[str], is_package: bool) -> set[str]:
    """The robust_transfer modules `name` imports, anywhere in it (function-level, lazy
    imports included): `from P import x` is an edge to the module P.x when x is one, else to
    P; a relative import is resolved against `name`'s package. An import of one of `name`'s
    own ancestor packages is no edge: Python runs a package's `__init__` before any of its
    modules, so it is never what starts a partial import (the CLI's commands register on
    `robust_transfer.cli.app` that way)."""
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.add(sub if sub in modules else base)
    return {m for m in edges & modules if not (name == m or name.startswith(m + "."))}


def _import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _import_edges(name, ast.parse(path.read_text()), set(modules),
                                path.name == "__init__.py")
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_modules_lazy_imports_included():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_lazy_circle():
    modules = {"robust_transfer.transfer.a", "robust_transfer.transfer.b",
               "robust_transfer.transfer"}
    a = ast.parse("from robust_transfer.transfer.b import f\n")
    b = ast.parse("def g():\n    from robust_transfer.transfer import a\n")
    graph = {"robust_transfer.transfer.a": _import_edges("robust_transfer.transfer.a", a,
                                                         modules, False),
             "robust_transfer.transfer.b": _import_edges("robust_transfer.transfer.b", b,
                                                         modules, False)}
    assert _cycles(graph) == [["robust_transfer.transfer.a", "robust_transfer.transfer.b"]]
    relative = ast.parse("from . import a\n")
    assert _import_edges("robust_transfer.transfer.b", relative, modules, False) == {
        "robust_transfer.transfer.a"}
    parent = ast.parse("from robust_transfer.transfer import f\n")
    assert _import_edges("robust_transfer.transfer.b", parent, modules, False) == set()
