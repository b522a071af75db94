"""Hostile resume checkpoints and faults while saving one: errors name the file; old checkpoints stay whole."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

from minilora.errors import CheckpointError
from minilora.loading import from_pretrained
from minilora.lora import add_lora
from minilora.train import checkpoint as ckpt


@pytest.fixture()
def run(hf_tiny_llama_dir, tmp_path):
    model = from_pretrained(hf_tiny_llama_dir)
    add_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    out = tmp_path / "run"
    ckpt.save_checkpoint(out, 1, model, opt, sched, {"epoch": 0})
    return model, opt, sched, out


def _tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("step", [1, 2])  # the same step saved again, and a new one
def test_fault_while_saving_keeps_previous_checkpoints(run, monkeypatch, step):
    model, opt, sched, out = run
    before = _tree(out)
    real = torch.save

    def flaky(obj, path, *args, **kwargs):
        if os.path.basename(path) == "scheduler.pt":  # optimizer.pt is written, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
        real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: _Usage())
    with pytest.raises(
        OSError, match=r"no space left on the device while writing .*checkpoint-00000.-.*scheduler.pt"
    ) as e:
        ckpt.save_checkpoint(out, step, model, opt, sched, {"epoch": 0})
    assert e.value.errno == errno.ENOSPC
    assert _tree(out) == before
    assert [c.step for c in ckpt.list_checkpoints(out)] == [1]


class _Usage:
    free = 0


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_truncated_resume_file_names_it(run, name):
    *_, out = run
    path = ckpt.latest_checkpoint(out).directory / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{path}: unreadable .*truncated or corrupted"):
        ckpt.load_checkpoint_state(ckpt.latest_checkpoint(out))


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickle_refusal_names_the_file(run):
    *_, out = run
    path = ckpt.latest_checkpoint(out).directory / "scheduler.pt"
    torch.save({"x": _Evil()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match=f"{path}: refused to unpickle it"):
        ckpt.load_checkpoint_state(ckpt.latest_checkpoint(out))


def test_truncated_adapter_in_resume_checkpoint(run):
    model, *_, out = run
    latest = ckpt.latest_checkpoint(out)
    weights = latest.adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=f"resume checkpoint {latest.directory}: {weights} is not a valid"):
        ckpt.load_adapter_weights_into(model, latest.adapter)
