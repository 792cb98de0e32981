"""The layering of DESIGN.md, checked on the source: a package imports only from the packages
before it (data → models → attacks → defenses → certify → train → backdoors → transfer →
explain → report → cli), and from the top-level helpers (errors, atomic, stats, variables)
that every layer shares."""

from __future__ import annotations

import ast
from pathlib import Path

import robust_transfer

# certify (randomized smoothing) needs only models and attacks, and grids certify the models
# they fine-tune (transfer/), so it sits right after defenses.
LAYERS = ("data", "models", "attacks", "defenses", "certify", "train", "backdoors", "transfer",
          "explain", "report", "cli")
SHARED = {"errors", "atomic", "stats", "variables"}
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
