"""DDP and FSDP2 QLoRA on 2 and 4 CPU processes (gloo, torchrun) against the single-process run.

Every run trains the tiny random Llama (NF4 + double quant base) for 10 steps of a global batch of 4 rows
x 2 micro-batches (tests/train/_dist_script.py); the data ends each epoch on a short batch, so a rank of
the 4-process run gets a row with no labels. Summation order differs across ranks, so losses and adapters
are equal within fp32 rounding, not bit for bit; a resume on the same ranks is bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from minilora.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_dist_script.py")
STEPS = 10


def _run(model_dir: Path, out: Path, strategy: str, nproc: int = 1, *extra: str, ok: bool = True) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    args = [str(SCRIPT), str(model_dir), str(out), str(STEPS), "--strategy", strategy, *extra]
    if strategy != "single":  # torchrun picks a free port itself (--standalone)
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=240)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        assert proc.returncode != 0, "the run was meant to die"


def _losses(out: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_run(out: Path, ref: Path) -> None:
    got, want = _losses(out), _losses(ref)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "metrics.jsonl holds each step once (rank 0 only)"
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), rtol=1e-6, atol=0)
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((ref / "adapter" / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def single(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(tiny_dir, out, "single")
    return out


def test_ddp_two_ranks_equals_one_process(tiny_dir: Path, single: Path, tmp_path: Path) -> None:
    _run(tiny_dir, tmp_path / "ddp", "ddp", 2)
    _assert_same_run(tmp_path / "ddp", single)


@pytest.fixture(scope="module")
def fsdp(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _run(tiny_dir, out, "fsdp", 2, "--checkpointing", "--report", str(out.parent / "report.jsonl"))
    return out


def test_fsdp2_two_ranks_with_checkpointing_equals_one_process(fsdp: Path, single: Path) -> None:
    _assert_same_run(fsdp, single)
    reports = [json.loads(line) for line in (fsdp.parent / "report.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:  # 14 quantized projections (q,k,v,o,gate,up,down x 2 layers), codes + state, halved
        assert r["n"] == 14 and r["local"] * 2 == r["full"]


def test_fsdp2_kill_and_resume_on_two_ranks_is_exact(tiny_dir: Path, fsdp: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(tiny_dir, out, "fsdp", 2, "--checkpointing", "--die-after", "4", ok=False)
    assert latest_checkpoint(out).step == 4 and not (out / "adapter").exists()
    _run(tiny_dir, out, "fsdp", 2, "--checkpointing", "--resume")
    assert _losses(out) == _losses(fsdp)  # bit for bit
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        fsdp / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_fsdp2_sharded_load_equals_load_then_shard(tiny_dir: Path, fsdp: Path, tmp_path: Path) -> None:
    """FSDP.load (each rank fills its own shards from the file) trains exactly as from_pretrained + wrap,
    and a rank never held much more than its half of the model plus the one full tensor being read."""
    out = tmp_path / "run"
    _run(tiny_dir, out, "fsdp", 2, "--checkpointing", "--sharded-load", "--report", str(tmp_path / "report.jsonl"))
    assert _losses(out) == _losses(fsdp)  # bit for bit: same shards, same adapter init
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        fsdp / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    reports = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        keys = len(list(f.keys()))
    whole = [json.loads(line) for line in (fsdp.parent / "report.jsonl").read_text().splitlines()]
    for r in whole:  # the load-then-shard path: every rank held the whole model after from_pretrained
        assert r["loaded_local"] == r["loaded_full"]
    for r in reports:
        full = r["loaded_full"]  # the whole model's parameters + buffers (4-bit bytes, embeddings, adapter, ...)
        assert r["loaded_local"] < 0.6 * full, r  # this rank's shards just after the load
        assert 0 < r["largest_read"] < 0.5 * full, r  # one checkpoint tensor at a time, never the whole model
        assert r["reads"] == keys, r  # each tensor of the file read once
        assert r["peak"] <= r["loaded_local"] + r["largest_read"], r  # shards + the tensor being read
        assert r["local"] * 2 == r["full"]  # the flat 4-bit parameters halved, as after wrap


def test_ddp_checkpoint_of_two_ranks_resumes_on_one(tiny_dir: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(tiny_dir, out, "ddp", 2, "--die-after", "6", ok=False)
    assert latest_checkpoint(out).step == 6
    _run(tiny_dir, out, "single", 1, "--resume")  # the same global batch, one rank
    _assert_same_run(out, single)


def test_fsdp2_four_ranks_equals_one_process_and_loads_sharded(tiny_dir: Path, single: Path, tmp_path: Path) -> None:
    """4 ranks train as one process; FSDP.load on 4 ranks trains bit for bit as load-then-shard on 4 ranks,
    each rank holding about a quarter of the model after the load (its shards) plus one tensor being read."""
    _run(tiny_dir, tmp_path / "fsdp4", "fsdp", 4)
    _assert_same_run(tmp_path / "fsdp4", single)
    out, report = tmp_path / "load4", tmp_path / "report.jsonl"
    _run(tiny_dir, out, "fsdp", 4, "--sharded-load", "--report", str(report))
    assert _losses(out) == _losses(tmp_path / "fsdp4")  # bit for bit: same shards, same adapter init
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "fsdp4" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in reports) == [0, 1, 2, 3]
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        keys = len(list(f.keys()))
    for r in reports:
        assert r["loaded_local"] < 0.35 * r["loaded_full"], r  # a quarter, and the few unsharded scalars
        assert r["reads"] == keys and r["peak"] <= r["loaded_local"] + r["largest_read"], r


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_world_size_one_on_nccl_equals_one_process(tiny_dir: Path, tmp_path: Path, strategy: str) -> None:
    _run(tiny_dir, tmp_path / "single", "single", 1, "--cuda")
    _run(tiny_dir, tmp_path / "dist", strategy, 1, "--cuda", "--checkpointing")
    got, want = _losses(tmp_path / "dist"), _losses(tmp_path / "single")
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), rtol=1e-4, atol=0)
    a, b = _adapter(tmp_path / "dist"), _adapter(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)
    _run(tiny_dir, tmp_path / "bf16", "fsdp", 1, "--cuda", "--bf16-params")  # mixed precision, bf16 4-bit storage
    assert abs(_losses(tmp_path / "bf16")[-1][1] - want[-1][1]) < 0.05


def test_minilora_finetune_under_torchrun_reports_once(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i} costs {i * 7} dollars"}) + "\n" for i in range(8)))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minilora"]
    cmd += ["finetune", str(tiny_dir), "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "4"]
    cmd += ["--distributed", "fsdp", "--bf16", "yes", "--no-progress", "--log-every", "1"]  # FSDP2 mixed precision
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained 2 steps") == 1, proc.stdout  # rank 0 alone reports
    assert proc.stdout.count("step 2/2") == 1, proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "README.md").is_file()
    losses = [v for _, v in _losses(out)]
    assert len(losses) == 2 and all(4.0 < v < 7.0 for v in losses), losses  # ~ln(259) on a random model
    run = json.loads((out / "checkpoints" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert run["step"] == 2
