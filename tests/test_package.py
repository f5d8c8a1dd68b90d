"""The package's shape: no import cycle between its modules, and no function-local import of
another package module (so that what a module needs is visible at its top)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "samora_components"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported package module, imported at top level) for every import of samora_components."""
    found = []
    top = set(map(id, tree.body))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(inner) for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("samora_components"):
                found.append((name, id(node) in top))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, local = {}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for name, at_top in _imports(tree, module, path.name == "__init__.py"):
            if name not in modules or name == module:
                continue
            if not at_top:
                local.append(f"{module} -> {name}")
            # a package's own __init__ re-exporting its modules is not a dependency of those modules
            if not (path.name == "__init__.py" and name.startswith(module + ".")):
                edges.add(name)
        graph[module] = edges
    return graph, local


def test_no_function_local_imports_between_package_modules():
    _, local = _graph()
    assert local == []


def test_no_import_cycle():
    graph, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 30  # the walk saw the package
