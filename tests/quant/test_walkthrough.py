"""docs/quantization.md quotes numbers that examples/quantization_walkthrough.py must still print."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_walkthrough_prints_every_number_the_doc_quotes():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quantization_walkthrough.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = (ROOT / "docs" / "quantization.md").read_text()
    quoted = re.findall(r"`([^`]*\d[^`]*)`", doc)
    numbers = [q for q in quoted if re.fullmatch(r"[\[\]+\-0-9., e]+", q)]
    assert len(numbers) >= 12, numbers
    flat_out = out.replace("'", "").replace("0x", "")
    for number in numbers:
        assert number in out or number in flat_out, f"the doc quotes {number!r}, the example no longer prints it"
    assert "0xb1" in out and "[183, 224, 0, 208]" in out
