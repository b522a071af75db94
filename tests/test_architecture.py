"""minilora's import graph: no circles, and no arrow against the floors of docs/architecture.md.

Every ``import`` and ``from ... import`` in every module counts, at module level or inside a function (a
lazy import is still a dependency). A module may import its own floor or a lower one; the floor table is
read from the doc, so the doc and this test cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"
DOC = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The longest minilora module that ``name`` (a module or a name inside one) lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The minilora modules ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` imports pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in map(_known, (t for t in targets if t.split(".")[0] == "minilora")) if t)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def floor_table() -> dict[str, int]:
    """``{module prefix: floor}`` from the table rows ``| N | `prefix`, `prefix` | ... |`` of the doc."""
    table: dict[str, int] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        row = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for prefix in re.findall(r"`([\w.]+)`", row.group(2)):
                assert prefix not in table, f"{DOC}: {prefix} is listed on two floors"
                table[prefix] = int(row.group(1))
    assert table, f"{DOC}: no floor table (rows like '| 0 | `minilora.errors` | ... |')"
    return table


def floor_of(module: str, table: dict[str, int]) -> int:
    name = module
    while name not in table:
        assert "." in name, f"{module} is on no floor of {DOC}: add it to the table"
        name = name.rpartition(".")[0]
    return table[name]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    assert "minilora.loading" in GRAPH["minilora"]
    assert "minilora.models.llama" in GRAPH["minilora.decode"]
    assert "minilora.lora.api" in GRAPH["minilora.lora"]  # `from .api import ...`


def test_no_circles() -> None:
    found = cycles(GRAPH)
    assert not found, "import circles in minilora/:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_arrow_against_the_floors() -> None:
    table = floor_table()
    wrong = sorted(
        f"{m} (floor {floor_of(m, table)}) imports {t} (floor {floor_of(t, table)})"
        for m, targets in GRAPH.items()
        for t in targets
        if floor_of(t, table) > floor_of(m, table)
    )
    assert not wrong, "imports against the floors of docs/architecture.md:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycles_finds_a_circle(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
