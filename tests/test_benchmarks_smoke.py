"""Every CPU benchmark suite runs end to end in smoke mode, so the benchmark code cannot rot.

Asserts that the result files exist and carry the expected columns and keys; never asserts on timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from benchmarks.run import RESULTS, SUITES, main, output_dir, parse  # noqa: E402  (after the importorskips)

EXPECTED = {
    "quant": {
        "columns": ["minilora ms", "bitsandbytes ms", "ratio (minilora/bnb time)", "identical", "select-tree bound"],
        "keys": [
            "minilora_quantize_s",
            "bitsandbytes_dequantize_s",
            "quantize_ratio",
            "identical_packed",
            "tree_floor_fresh_s",
        ],
    },
    "quality": {
        "columns": ["rel. Frobenius minilora", "rel. Frobenius bnb", "identical codes", "transformers + bnb"],
        "keys": ["gaussian", "smollm2", "perplexity"],
    },
    "speed": {
        "columns": ["minilora ms", "bitsandbytes ms", "tokens/s", "transformers + bnb + peft"],
        "keys": ["linear_4bit", "qlora_step"],
    },
    "loading": {
        "columns": ["load time s", "peak RSS added MB", "transformers + bnb"],
        "keys": ["minilora", "reference", "bound_bytes", "acceptance_passed"],
    },
    "generate": {
        "columns": ["minilora ms", "transformers ms", "minilora tokens/s", "same ids from the start"],
        "keys": ["generate", "shared_prefix", "first_token_s", "new_ids"],
    },
    "tokenizers": {
        "columns": ["tokens / description", "tokens in $1,234.00", "fp32 logits MB", "examples/s"],
        "keys": ["tokenizers", "description_tokens", "prices", "qlora_step", "logits_fp32_bytes_per_batch"],
    },
    "train_memory": {
        "columns": ["estimated growth MB", "measured growth MB (malloc trimmed)", "verdict"],
        "keys": ["cases", "estimate_items", "relative_error"],
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_suite_smoke(suite: str, tmp_path: Path) -> None:
    assert main([suite, "--smoke", "--out", str(tmp_path)]) == 0
    stem = suite.replace("_", "-")  # train_memory writes train-memory-cpu.*
    md = (tmp_path / f"{stem}-cpu.md").read_text()
    record = json.loads((tmp_path / f"{stem}-cpu.json").read_text())
    for column in EXPECTED[suite]["columns"]:
        assert column in md, column
    for key in EXPECTED[suite]["keys"]:
        assert _has_key(record["results"], key), key
    env = record["environment"]
    for key in ("command", "cpu", "cores", "date", "torch", "bitsandbytes", "transformers", "peft", "minilora"):
        assert key in env, key
    assert env["smoke"] is True
    for figure in record["results"].get("figures", []):
        assert (tmp_path / figure).stat().st_size > 0
    if suite == "quant":  # the kernels it takes apart, the select-tree bound included, are real dequantizes
        for rec in record["results"]["decomposed"]:
            assert {"minilora_kernel_mapped", "tree_floor_mapped", "tree_floor_fresh"} <= set(rec["identical_to_bnb"])
            assert all(rec["identical_to_bnb"].values()), rec["identical_to_bnb"]


def _has_key(data: object, key: str) -> bool:
    if isinstance(data, dict):
        return key in data or any(_has_key(v, key) for v in data.values())
    if isinstance(data, list):
        return any(_has_key(v, key) for v in data)
    return False


def test_smoke_never_writes_into_results() -> None:
    smoke = output_dir(parse(["quant", "--smoke"]))
    assert smoke.is_dir() and smoke.resolve() != RESULTS.resolve()
    smoke.rmdir()
    assert output_dir(parse(["quant"])) == RESULTS
    with pytest.raises(SystemExit):
        parse(["no-such-suite"])


def test_device_flag() -> None:
    import torch

    from benchmarks.run import device_error

    assert parse(["quality"]).device == "cpu"
    assert parse(["loading", "--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        parse(["quality", "--device", "tpu"])
    assert device_error("cpu") is None
    if not torch.cuda.is_available():
        message = device_error("cuda")
        assert message is not None and "no CUDA device" in message
        assert main(["quality", "--device", "cuda"]) == 2
