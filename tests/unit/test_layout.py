"""The code's layering: no import cycle between harness's packages (`runtime.engine`,
`runtime.sandbox`, `runtime.front`, `runtime.integrity`, `runtime.secrets`, and the top-level
modules). A
cycle means two phases that cannot be read, tested or replaced one without the other. And
no module grows past ~350 lines without saying at its top why it is one module."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def _module(path: Path) -> str:
    parts = path.relative_to(RUNTIME.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """A package below runtime (runtime.engine), or a top-level module (runtime.config)."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in RUNTIME.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != "runtime" and _unit(target) != _unit(name):
                    graph[_unit(name)].add(_unit(target))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    # The graph is real: the launcher and its startup plan use every phase.
    used = graph["runtime.launcher"] | graph["runtime.startup"]
    assert {"runtime.engine", "runtime.sandbox", "runtime.front", "runtime.weights"} <= used
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


LARGE = 350  # lines; a module past this says at its top why it is one module


def test_every_large_module_says_why_it_is_one() -> None:
    unexplained = []
    for path in sorted(RUNTIME.rglob("*.py")):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > LARGE and not re.search(
            r"Why one module[^:]*:\s*\S.{40,}", doc
        ):
            unexplained.append(f"{path.relative_to(RUNTIME.parent)} ({len(text.splitlines())})")
    assert not unexplained, (
        f"modules over {LARGE} lines whose docstring gives no 'Why one module ...: <reason>': "
        f"split them, or say why not: {unexplained}"
    )
