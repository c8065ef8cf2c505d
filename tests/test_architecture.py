"""The package's structure: no import circles (lazy imports included), small modules, public API.

The import graph is read from the source (every ``import`` statement, also inside functions), so a
circle hidden by a lazy import fails here even though it never breaks at run time. ``if
TYPE_CHECKING:`` blocks are skipped: they never execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch_crisp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"torch_crisp": ROOT / "torch_crisp", "torch_crisp.integrations": ROOT / "integrations"}
MAX_MODULE_LINES = 450


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules among ``known`` that ``module`` imports (statements inside functions included).

    ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else (an attribute)
    the module ``pkg``; a package's ``__init__`` is not counted as imported by its submodules.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                origin = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return (found & known) - {module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        module: _imported_modules(ast.parse(path.read_text()), module, path.name == "__init__.py", set(modules))
        for module, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_lazy_import_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    source = "from . import b\ndef f():\n    from .c import thing\nif TYPE_CHECKING:\n    from .d import other\n"
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    assert _imported_modules(ast.parse(source), "pkg.a", False, known) == {"pkg.b", "pkg.c"}


def test_the_graph_is_read_from_the_real_package():
    graph = import_graph()
    assert "torch_crisp.projector" in graph["torch_crisp"]
    assert "torch_crisp.commands.common" in graph["torch_crisp.editing.cli"]  # a lazy import
    assert "torch_crisp.integrations.hf_trainer" in graph


def test_no_source_module_is_a_large_room():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_package_exports_the_public_api_only():
    assert set(torch_crisp.__all__) == {
        "CrispConfig", "CrispOptimizer", "CrispProjector", "SequentialEditor", "functional",
        "reproject_optimizer_state",
    }
    for name in torch_crisp.__all__:
        assert getattr(torch_crisp, name) is not None
