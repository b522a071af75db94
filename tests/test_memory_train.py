"""minilora.memory_train: the meta-device trace counts what a real training forward saves, byte for byte;
the persistent items follow the formats (8B figures of formats.md); `minilora footprint --train` prints it.
(Estimate vs measured peak: benchmarks/cpu/train_memory.py and benchmarks/gpu/train_memory.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minilora.memory_train import TrainSetup, expand_targets, saved_bytes, train_footprint

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from minilora.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_meta_trace_equals_what_a_real_forward_saves(tiny_dir: Path, quantize: str) -> None:
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    model = from_pretrained(tiny_dir, quantize=None if quantize == "none" else quantize)
    add_lora(model, r=4, alpha=8, target_modules=list(ATTN))
    model.train()
    exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    real, _ = saved_bytes(lambda: model.model(ids), exclude, fused_attention=False)  # torch's own CPU kernels
    fp = train_footprint(tiny_dir, TrainSetup(4, ATTN, batch=2, seq=40, quantize=quantize))
    assert fp.items["activations"] == real
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fp.trainable_params == n_adapter
    assert fp.items["adapter (fp32)"] == fp.items["gradients (fp32)"] == 4 * n_adapter
    assert fp.items["AdamW states (fp32)"] == 8 * n_adapter


def test_llama31_8b_items_and_checkpointing(tmp_path: Path) -> None:
    from tests.test_memory import LLAMA31_8B

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31_8B))
    plain = train_footprint(path, TrainSetup(32, ATTN, 4, 182, dtype=torch.bfloat16))
    ckpt = train_footprint(path, TrainSetup(32, ATTN, 4, 182, gradient_checkpointing=True, dtype=torch.bfloat16))
    assert plain.trainable_params == 27_262_976
    assert plain.items["adapter (fp32)"] == 109_051_904
    assert abs(plain.items["weights"] - 5_591_539_712) < 1024  # formats.md s. 4 (+ the RoPE buffer)
    n, vocab = 4 * 181, 128256
    logits = plain.items["logits (saved log-softmax + 2 gradients)"]
    assert 0 <= logits - 3 * n * vocab * 4 <= 8 * n + 64  # + the int64 targets cross_entropy keeps
    layer_inputs = 32 * 4 * 182 * 4096 * 2
    assert layer_inputs < ckpt.items["activations (checkpointed: layer inputs)"] < plain.items["activations"] / 10
    assert ckpt.total < plain.total


def test_footprint_train_cli(tmp_path: Path, capsys) -> None:
    from minilora.cli import main
    from tests.test_memory import LLAMA31_8B

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31_8B))
    argv = ["footprint", str(path), "--train", "--r", "32", "--targets", "q,k,v,o", "--batch", "4", "--seq", "182"]
    assert main([*argv, "--gradient-checkpointing", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "27,262,976 trainable parameters" in out and "with gradient checkpointing" in out
    assert "| AdamW states (fp32) | 218,103,808 |" in out and "**total (estimated peak)**" in out
    assert expand_targets("q,v,down") == ("q_proj", "v_proj", "down_proj")
