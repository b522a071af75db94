"""examples/lora_walkthrough.py runs and prints the numbers docs/lora.md quotes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_walkthrough_prints_the_documented_numbers() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lora_walkthrough.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    ).stdout
    doc = (ROOT / "docs" / "lora.md").read_text()
    expected_lines = [
        "output change when the adapter is added: 0.0",
        "first step gradients: |dA| max 0.0, |dB| max",
        "with A = 0 too: |dA| + |dB| = 0.0 (training can never start)",
        "r=32, alpha=64: LoRA scaling 2.00, rsLoRA scaling 11.31",
        "m starts as ||W||_row: max gap 0.0",
        "DoRA output change when added: 0.0e+00",
        "base params: 8,030,261,248 (6,979,321,856 in the decoder Linears)",
        "footprint fp32: 32.12 GB",
        "footprint 8-bit Linears, rest 16-bit: 9.08 GB",
        "footprint 4-bit Linears, rest 16-bit: 5.59 GB (5,591,539,712 B)",
        "= 851,968; x 32 layers = 27,262,976",
        "trainable params: 27,262,976 || all params: 8,057,524,224 || trainable%: 0.3384",
        "adapter size (float32): 109,051,904 B = 109.05 MB",
        "4-bit footprint + fp32 adapter: 5.70 GB",
        "DoRA adds 327,680 magnitude params (27,590,656 trainable)",
        "grad(A, B) through NF4 vs through its dequantized float copy: max diff 0.0e+00",
        "NF4 + double quant storage: 4.127 bits/param",
    ]
    for line in expected_lines:
        assert line in out, line
    # rsLoRA keeps the one-step change flat in r; plain LoRA's shrinks (roughly like 1/r).
    rows = re.findall(r"^(\d+)\s+([\d.e+-]+)\s+([\d.e+-]+)$", out, flags=re.M)
    assert [int(r) for r, _, _ in rows] == [4, 16, 64, 256]
    lora = [float(a) for _, a, _ in rows]
    rs = [float(b) for _, _, b in rows]
    assert lora[0] / lora[-1] > 50 and max(rs[1:]) / min(rs[1:]) < 1.5
    # Every table row and every quoted figure of the doc is what the script printed.
    for r, a, b in rows:
        assert f"| {r} | {a} | {b} |" in doc
    merge = re.search(r"max abs error ([\d.e+-]+), relative ([\d.]+)", out)
    grad_b = re.search(r"\|dB\| max ([\d.]+)", out)
    for figure in ("27,262,976", "8,057,524,224", "109.05 MB", "5,591,539,712", "327,680", "4.127", "11.31"):
        assert figure in doc and figure in out, figure
    for figure in (merge.group(1), merge.group(2), grad_b.group(1)):
        assert f"`{figure}`" in doc, figure
