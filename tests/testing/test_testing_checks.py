"""minilora.testing's checks on hand-made pairs (each property fails where it should, naming the block), its
import without hypothesis, and its pytest plugin run the way a user runs it (docs/testing.md's example)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.testing import (
    QuantCheckFailure,
    QuantizerPair,
    check_agrees_with,
    check_all,
    check_error_bound,
    check_idempotent,
    check_shape_and_dtype,
    fourbit_format,
    minilora_pair,
)

REPO = Path(__file__).resolve().parents[2]


def _pair(name: str, dequantize, blocksize: int = 64) -> QuantizerPair:
    good = minilora_pair("nf4", blocksize)
    return QuantizerPair(
        name, good.quantize, lambda q: dequantize(good.dequantize(q)), fourbit_format("nf4", blocksize)
    )


def test_minilora_pairs_pass_every_check():
    x = torch.randn(7, 333, generator=torch.Generator().manual_seed(0))
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            check_all(minilora_pair(quant_type, 64, double_quant), x)


def test_each_check_fails_on_the_property_it_guards():
    x = torch.randn(300, generator=torch.Generator().manual_seed(1))
    with pytest.raises(QuantCheckFailure, match=r"came back as \[300\] torch.float16"):
        check_shape_and_dtype(_pair("half", lambda y: y.half()), x)
    with pytest.raises(QuantCheckFailure, match=r"came back as \[3, 100\]"):
        check_shape_and_dtype(_pair("reshaped", lambda y: y.view(3, 100)), x)
    # one value moved past the bound, in block 4 (elements 256..299, the partial last block)
    moved = _pair("moved", lambda y: torch.where(torch.arange(300) == 260, y + 1.0, y))
    with pytest.raises(
        QuantCheckFailure, match=r"block 4 \(the partial last block\): elements 256\.\.299 of 300.*element 260"
    ):
        check_error_bound(moved, x)
    # shrinking every value by 1% stays within the bound but is not idempotent
    shrink = _pair("shrink", lambda y: y * 0.99)
    check_error_bound(shrink, x * 0 + 1e-3)
    with pytest.raises(QuantCheckFailure, match="not idempotent in block 0"):
        check_idempotent(shrink, x)
    with pytest.raises(QuantCheckFailure, match="disagrees with minilora nf4 blocksize 64"):
        check_agrees_with(shrink, minilora_pair("nf4", 64), x)
    check_agrees_with(shrink, minilora_pair("nf4", 64), x, rtol=0.0101)


def test_error_bound_is_the_half_gap_times_absmax():
    """Half the widest NF4 gap (-1 to -0.696) times absmax; a subnormal block only promises absmax."""
    fmt = fourbit_format("nf4", 64)
    assert fmt.max_half_gap == pytest.approx((1.0 - 0.6961928009986877) / 2)
    assert torch.equal(fmt.block_bound(torch.tensor([2.0, -1.0])), torch.tensor([2.0 * fmt.max_half_gap * (1 + 1e-6)]))
    tiny = torch.tensor([1e-39, -5e-40])  # subnormal block: only |error| <= absmax is promised
    assert torch.equal(fmt.block_bound(tiny), torch.tensor([1e-39]))


def test_checks_import_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import torch, minilora.testing as t\n"
        "t.check_all(t.minilora_pair('nf4', 64), torch.randn(100))\n"
        "try:\n    t.strategies\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: minilora.testing.strategies needs hypothesis: pip install 'minilora[testing]'" in out.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _docs_blocks(name: str) -> dict[str, str]:
    """The ```python blocks of docs/<name> whose first line is `# file: NAME`, by NAME."""
    text = (REPO / "docs" / name).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n# file: (\S+)\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def test_the_docs_example_runs_as_a_user_runs_it(tmp_path: Path):
    """docs/testing.md: a conftest enabling the plugin and a test file; pytest fails the broken quantizer with
    the shrunk counterexample (one element) and passes minilora's."""
    pytest.importorskip("hypothesis")
    blocks = _docs_blocks("testing.md")
    assert {"conftest.py", "test_my_quantizer.py"} <= blocks.keys()
    for name, body in blocks.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--minilora-examples", "100", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert "1 failed, 1 passed" in text, text
    assert "my nf4: round-trip error over the bound in block 0" in text, text
    assert "shrunk input: 32, tensor[1] torch.float32" in text, text
