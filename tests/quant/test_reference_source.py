"""The reference (minilora/quant/*.py) is plain PyTorch: no device or environment checks, no fast paths.

Deciding from the device which rule or kernel runs is the door's job (minilora/kernels/dispatch.py); the
reference takes the rule as an argument. This test reads the source, so a new check cannot slip in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

QUANT = Path(__file__).resolve().parents[2] / "minilora" / "quant"
FORBIDDEN = {
    "torch.cuda": r"\btorch\.cuda\b",
    ".is_cuda": r"\.is_cuda\b",
    "device.type": r"\bdevice\.type\b",
    "os.environ": r"\bos\.environ\b",
    "os.getenv": r"\bos\.getenv\b|\bgetenv\(",
}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the source without its docstrings and comments: prose may name what code may not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for line in range(node.lineno, node.end_lineno + 1)
    }
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i, text.split("#")[0]) for i, text in enumerate(lines, 1) if i not in docstrings]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            found.update([base] + [f"{base}.{a.name}" for a in node.names])
    return found


REFERENCE_FILES = sorted(QUANT.glob("*.py"))


def test_the_reference_files_are_found() -> None:
    assert {p.name for p in REFERENCE_FILES} >= {"blockwise.py", "codebooks.py", "int8.py", "bnb_cuda_rule.py"}


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: p.name)
def test_no_device_or_environment_checks(path: Path) -> None:
    found = [
        f"{path.name}:{i}: {name}: {text.strip()}"
        for i, text in _code_lines(path)
        for name, pattern in FORBIDDEN.items()
        if re.search(pattern, text)
    ]
    assert not found, "the reference decides nothing from the device or the environment:\n" + "\n".join(found)


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=lambda p: p.name)
def test_no_triton_and_no_kernels(path: Path) -> None:
    wrong = sorted(
        name
        for name in _imports(path)
        if name.split(".")[0] == "triton" or "kernels" in name.split(".") or name.startswith("..kernels")
    )
    assert not wrong, f"{path.name} imports {wrong}: fast paths import the reference, never the reverse"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""torch.cuda in prose is fine."""\nimport os\nfrom ..kernels import dispatch\nimport triton.language\n'
        "def f(x):\n    return x.is_cuda or os.environ.get('A') or x.device.type  # torch.cuda\n",
        encoding="utf-8",
    )
    hits = {name for _, text in _code_lines(bad) for name, pattern in FORBIDDEN.items() if re.search(pattern, text)}
    assert hits == {".is_cuda", "os.environ", "device.type"}
    assert {"..kernels", "triton.language"} <= _imports(bad)
