"""Kill -9 at a random step, resume, and end with the same adapter bytes and loss curve as a clean run.

Training runs in a subprocess (tests/train/_train_script.py) on a tiny random model; each step is slowed
down a little so the parent can kill it mid-run. Also: a kill while a checkpoint is being written leaves
only a hidden temp directory, which is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minilora.train.checkpoint import latest_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_train_script.py")
STEPS = 12


def _cmd(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(model_dir), str(out), str(STEPS), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _run(_cmd(tiny_dir, out))
    return out


def test_sigkill_at_a_random_step_then_resume_is_exact(tiny_dir: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kill_after = random.Random().choice([2, 4, 6, 8])  # a checkpoint every 2 steps
    proc = subprocess.Popen(_cmd(tiny_dir, out, "--slow"), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(c.step >= kill_after for c in list_checkpoints(out)), proc)
        time.sleep(random.Random().uniform(0.0, 0.3))  # somewhere in the next steps
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists(), "the run was killed too late to test anything"
    killed_at = latest_checkpoint(out).step
    assert killed_at >= kill_after

    _run(_cmd(tiny_dir, out, "--resume"))
    assert _losses(out) == _losses(reference)  # every step once, same values, bit for bit
    assert [s for s, _ in _losses(out)] == list(range(1, STEPS + 1))
    assert _adapter_bytes(out) == _adapter_bytes(reference)
    assert len(list_checkpoints(out)) <= 2  # keep_last


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_valid(
    tiny_dir: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    marker = tmp_path / "writing"
    # --hang-at 6: the script blocks half way through writing checkpoint 6 (after the adapter and
    # optimizer files, before trainer_state.json and the rename) and touches the marker file.
    proc = subprocess.Popen(
        _cmd(tiny_dir, out, "--hang-at", "6", "--marker", str(marker)), env=_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(marker.exists, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    root = out / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-checkpoint-000006")]
    assert partial and (partial[0] / "adapter" / "adapter_model.safetensors").exists()
    assert not (partial[0] / "trainer_state.json").exists()
    assert latest_checkpoint(out).step == 4  # the half-written one is not a checkpoint

    _run(_cmd(tiny_dir, out, "--resume"))
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # cleaned up
    assert _losses(out) == _losses(reference)
    assert _adapter_bytes(out) == _adapter_bytes(reference)
