"""The package's layout is its architecture: sub-packages in layers, without cycles between them.

Read from the source (every `import`, also those inside functions), so a lazy import cannot hide
a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lib_training"


def _unit(module: str) -> str:
    """The part of lib_training a dotted module belongs to: its sub-package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports() -> dict[str, set[str]]:
    """Each module of lib_training (dotted) -> the lib_training modules it imports."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[name] = {t for t in targets if t.startswith("lib_training.")}
    return found


def _unit_graph() -> dict[str, set[str]]:
    """Which parts of the package import which others."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        graph[_unit(module)] |= {_unit(t) for t in targets if _unit(t) != _unit(module)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_between_the_parts_of_the_package() -> None:
    assert _cycle(_unit_graph()) is None


def test_only_the_host_glue_imports_the_host_adapters() -> None:
    offenders = [
        m for m, targets in _imports().items() if _unit(m) != "hosts" and any(_unit(t) == "hosts" for t in targets)
    ]
    assert offenders == []


def test_nothing_below_the_app_layer_imports_the_app_layer() -> None:
    above = {"app", "hosts", "__main__"}
    offenders = [
        m for m, targets in _imports().items() if _unit(m) not in above and any(_unit(t) == "app" for t in targets)
    ]
    assert offenders == []


def test_the_package_keeps_at_most_eight_modules_at_its_top_level() -> None:
    modules = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) <= 8, modules
