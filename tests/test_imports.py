"""The package's import graph: no cycles and nothing imported from the workflow's ``pipeline/``
folder (the package stands without the workflow).

Two graphs are checked: the imports run when a module is imported (its module-level
statements), and every import statement of the file, those inside functions included (a few
modules import heavy or optional libraries lazily; a lazy import must not hide a cycle between
our own modules either). ``if TYPE_CHECKING:`` blocks are left out of both: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nidl_dino"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _module_level(body: list[ast.stmt]):
    """The statements run at import: the body, into if/try blocks, not into functions."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _module_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                yield from _module_level(handler.body)
        else:
            yield node


def _everywhere(tree: ast.Module):
    """Every node of the file except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, modules: dict[str, Path], everywhere: bool = False) -> list[str]:
    """Every module an import statement of the file names: at module level, or anywhere.

    ``from package import submodule`` names the submodule; ``from module import name`` the module.
    """
    names = []
    tree = ast.parse(path.read_text())
    for node in _everywhere(tree) if everywhere else _module_level(tree.body):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _graph(everywhere: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    return {
        name: {t for t in _imports(path, mods, everywhere) if t in mods and t != name}
        for name, path in mods.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 30 and graph["nidl_dino.training.run"]  # the graph was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_cycle_through_imports_inside_functions_either():
    graph = _graph(everywhere=True)
    assert graph["nidl_dino.demo.dataset"] >= _graph()["nidl_dino.demo.dataset"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_type_checking_imports_are_left_out():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
        "def f():\n    import c\n"
    )
    found = {n.names[0].name for n in _everywhere(tree) if isinstance(n, ast.Import)}
    assert found == {"b", "c"}


def test_nothing_in_the_package_imports_the_workflow():
    found = [
        f"{name}: {target}"
        for name, path in _modules().items()
        for target in _imports(path, {}, everywhere=True)
        if target == "pipeline" or target.startswith("pipeline.")
    ]
    assert not found, found
