"""Every CPU benchmark suite runs end to end in smoke mode, so the benchmark code cannot rot; the one
harness (benchmarks/harness.py) works on CPU, every CPU and GPU suite module imports, and the GPU suites
refuse clearly without CUDA.

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

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from benchmarks import harness  # noqa: E402  (after the importorskips)
from benchmarks.run import GPU_SUITES, RESULTS, SUITES, main, output_dir, parse  # noqa: E402

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


@pytest.mark.parametrize(
    "module", [f"benchmarks.cpu.{s}" for s in SUITES] + [f"benchmarks.gpu.{m}" for m, _ in GPU_SUITES.values()]
)
def test_every_suite_module_imports(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:  # GPU suites whose kernels need triton (not installed without CUDA)
        assert module.startswith("benchmarks.gpu.") and e.name == "triton", e


def test_gpu_suites_refuse_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is what a CPU machine sees")
    assert main(["kernels", "--quick"]) == 2
    assert "GPU suite(s) kernels need a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["quant", "--quick"])  # a GPU suite's flag without a GPU suite
    with pytest.raises(SystemExit):
        parse(["decode_default", "--smoke"])


def test_harness_child_and_timeout() -> None:
    children = "tests.benchmark_children"
    assert harness.run_child(children, "echo", {"value": 21}) == {"value": 21, "doubled": 42}
    with pytest.raises(RuntimeError, match="timeout of 1"):
        harness.run_child(children, "sleep", {"seconds": 30}, timeout=1)


def test_harness_script_timeout_and_log(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    assert harness.run_script("benchmarks.harness", [], timeout=60, log=log) != 0  # no arguments: IndexError
    assert "IndexError" in log.read_text()
    code = harness.run_script("http.server", ["0", "--bind", "127.0.0.1"], timeout=1, log=tmp_path / "t.log")
    assert code == 124


def test_harness_rows_and_files(tmp_path: Path) -> None:
    row = harness.ratio_row("4x182", 300.0, 150.0, "tokens/s")
    assert row == {"case": "4x182", "minilora": 300.0, "reference": 150.0, "ratio": 2.0, "unit": "tokens/s"}
    assert harness.ratio_row("missing", None, 1.0, "s") is None
    assert harness.ratio_row("zero reference", 1.0, 0, "s") is None
    env = harness.environment(["quant", "--smoke"], device="cpu")
    assert env["command"] == "python -m benchmarks quant --smoke"
    for key in ("date", "cpu", "cores", "torch", "bitsandbytes", "transformers", "peft", "minilora", "gpu"):
        assert key in env, key
    assert harness.environment(device="cpu")["command"].endswith(" ".join(sys.argv))
    md = "# t\n\n" + harness.md_table(harness.ROW_HEADER, [[row[k] for k in harness.ROW_HEADER]])
    md_path, json_path = harness.write_results(tmp_path / "out", "t-cpu", {"environment": env, "rows": [row]}, md)
    assert "| 4x182 | 300 | 150 | 2 | tokens/s |" in md_path.read_text()
    assert json.loads(json_path.read_text())["rows"] == [row]
    report = harness.Report("t", ["t", "--smoke"], tmp_path, smoke=True)
    report.table("rows", harness.ROW_HEADER, [[row[k] for k in harness.ROW_HEADER]])
    md_path, json_path = report.write()
    assert md_path.name == "t-cpu.md" and "- command: `python -m benchmarks t --smoke`" in md_path.read_text()
    assert json.loads(json_path.read_text())["environment"]["smoke"] is True


def test_no_sys_path_edits_in_benchmarks() -> None:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    offenders = [str(p) for p in root.rglob("*.py") if "sys.path" in p.read_text(encoding="utf-8")]
    assert offenders == []
    done = subprocess.run(["git", "ls-files", "benchmarks"], cwd=root.parent, capture_output=True, text=True)
    outside = [
        f
        for f in done.stdout.split()
        if not f.endswith((".py", ".md"))
        and not f.startswith("benchmarks/results/")
        and not f.startswith("benchmarks/data/")
    ]
    assert outside == [], outside
