"""The package's layers (docs/architecture.md): imports point one way, downwards, and no modules
import each other in a circle. The imports are read from the source with `ast` (every import,
also those inside functions; not those under ``if TYPE_CHECKING:``), so a lazy import inside a
function cannot hide an upward arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import e2ip

PACKAGE = Path(e2ip.__file__).parent

#: the layers, lowest first; a module may import its own layer's modules and lower layers only.
#: Within one layer, only modules of the same subpackage import each other.
LAYERS: list[tuple[str, ...]] = [
    ("e2ip.errors", "e2ip.files", "e2ip.constants", "e2ip._version", "e2ip.registry"),
    ("e2ip.data",),
    ("e2ip.nn",),
    ("e2ip.stats",),
    ("e2ip.backbones",),
    ("e2ip.heads",),
    ("e2ip.models",),
    ("e2ip.evaluation",),
    ("e2ip.train",),
    ("e2ip.integrations",),
    ("e2ip.dynamics",),
    ("e2ip.cli", "e2ip.testing"),
    ("e2ip",),  # the package root: the public API, re-exported
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, the unit it belongs to) of a module: the longest layer entry that is a
    prefix of its name."""
    best = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                if best is None or len(unit) > len(best[1]):
                    best = (index, unit)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, module: str) -> set[str]:
    """The e2ip modules `module` imports (a name imported from a package counts as the
    submodule when it is one, else as the package)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "e2ip")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "e2ip":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(module)
    return found


GRAPH = {m: imported_modules(p, m) for m, p in MODULES.items()}


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        unit_of(module)


def test_imports_point_downwards():
    upward = []
    for module, targets in GRAPH.items():
        layer, unit = unit_of(module)
        for target in sorted(targets):
            target_layer, target_unit = unit_of(target)
            if target_layer > layer or (target_layer == layer and target_unit != unit):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers (docs/architecture.md):\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    # the package root re-exports the public API and is imported by nobody inside
    graph = {m: {t for t in ts if t != "e2ip"} for m, ts in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_what_they_guard():
    """The checks themselves can fail: a cycle and an upward arrow planted in a copy of the graph."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert unit_of("e2ip.data.read")[0] < unit_of("e2ip.models.io")[0]
    assert unit_of("e2ip.heads.spd")[0] > unit_of("e2ip.nn.irreps")[0]


@pytest.mark.parametrize("source, expected", [
    ("from e2ip.models.io import load_model\n", {"e2ip.models.io"}),
    ("def f():\n    from e2ip.cli import main\n", {"e2ip.cli"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from e2ip.cli import main\n", set()),
    ("from e2ip.stats import metrics as M\n", {"e2ip.stats.metrics"}),
])
def test_imports_are_read_as_python_reads_them(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_modules(path, "e2ip.data.m") == expected
