"""The layout's rules hold: no import cycles (TYPE_CHECKING ones included), protocol/ never imports executor/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "executor")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others_even_for_type_checking() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the packages
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_protocol_depends_on_nothing_of_the_executor() -> None:
    graph = import_graph()
    wrong = {m: sorted(t for t in targets if t.startswith("executor")) for m, targets in graph.items()
             if m.startswith("protocol")}  # fmt: skip
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_gateway_uses_only_protocol_and_the_config() -> None:
    # executor/gateway is a daemon of its own: it knows the protocol and its config, never jobs or backends.
    graph = import_graph()
    # It reuses the telemetry's histogram buckets, scrape endpoint and exporters, which read no node.
    telemetry = ("executor.telemetry.recorder", "executor.telemetry.metrics", "executor.telemetry.prometheus",
                 "executor.telemetry.setup")  # fmt: skip
    # And the process's collector settings (executor/process/heap.py), which know nothing of either.
    allowed = ("protocol", "executor.config", "executor.gateway", "executor.process.heap", *telemetry)
    wrong = {m: sorted(t for t in targets if not t.startswith(allowed)) for m, targets in graph.items()
             if m.startswith("executor.gateway")}  # fmt: skip
    assert any(m.startswith("executor.gateway") for m in graph)
    assert {m: t for m, t in wrong.items() if t} == {}
