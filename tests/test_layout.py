"""The package's shape: no import cycles (not even hidden under TYPE_CHECKING), modules of
a readable size, no parking on trio.lowlevel.wait_task_rescheduled, and the WebSocket
engine's privates touched from one module."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "wsgate"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each wsgate module and the wsgate modules it imports (anywhere in it)."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(path) for path in SRC.rglob("*.py")}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("wsgate"):
                    # `from . import effects` imports the module wsgate.session.effects.
                    submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
                    found |= submodules or {target}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("wsgate")}
        graph[name] = {t for t in found if t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_in_src() -> None:
    graph = imports()
    graph.pop("wsgate", None)  # the package's __init__ re-exports; nothing imports it back
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_nothing_in_src_parks_on_wait_task_rescheduled() -> None:
    assert not [p.name for p in SRC.rglob("*.py") if "wait_task_rescheduled" in p.read_text()]


def test_a_counter_of_no_declared_family_fails_where_it_is_counted() -> None:
    import pytest

    from wsgate.metrics import Stats

    stats = Stats()
    stats["handshake.429"] += 1
    stats["published"] += 2
    with pytest.raises(KeyError, match="no such counter"):
        stats["handshak.429"] += 1  # a typo would have been a new, unexported series
    with pytest.raises(KeyError):
        stats["handshake"] += 1  # a family needs its label
    assert stats == {"handshake.429": 1, "published": 2}


def test_every_counter_family_is_exported() -> None:
    """Every declared family reaches /metrics (recheck, first_message and connection
    failures were counted but never exported)."""
    import trio

    from wsgate.metrics import FAMILIES, PLAIN
    from wsgate.testing import open_harness

    async def scrape() -> str:
        async with open_harness() as h:
            for prefix in FAMILIES:
                h.gateway.stats[f"{prefix}.x"] += 1
            for key in PLAIN:
                h.gateway.stats[key] += 1
            return h.gateway.metrics.exposition().decode()

    text = trio.run(scrape)
    for family in FAMILIES.values():
        assert f'{family.metric}_total{{{family.label}="x"}} 1.0' in text, family.metric
    for metric, _ in PLAIN.values():
        assert f"{metric}_total 1.0" in text, metric


def test_no_module_is_longer_than_a_reader_holds_in_mind() -> None:
    lengths = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 420} == {}


def test_trio_websocket_and_wsproto_privates_are_touched_from_wsconn_only() -> None:
    import re

    privates = re.compile(r"\._(reader_task|get_request|open_handshake|wsproto|stream_lock|frame_decoder)\b")
    touched = {p.name for p in SRC.rglob("*.py") if privates.search(p.read_text())}
    assert touched == {"wsconn.py"}
