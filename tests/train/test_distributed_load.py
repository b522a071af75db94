"""FSDP.load in this process (gloo, world size 1): the model it fills equals from_pretrained + FSDP.wrap, and
what it cannot load is refused before any weight is read. The 2-rank run is in test_distributed.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minilora.loading import from_pretrained, save_quantized
from minilora.lora import add_lora
from minilora.train.distributed import FSDP
from minilora.train.flat_4bit import FlatLinear4bit
from minilora.train.loop import seed_everything

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _prepare(model: torch.nn.Module, **lora: object) -> None:
    seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=TARGETS, **lora)


def _logits(fsdp: FSDP, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    root = fsdp.wrap(model, lambda m, x: (m(x), 0))  # the loss slot returns the logits here
    with torch.no_grad():
        return root(ids)[0]


@pytest.mark.parametrize("quantize", ["nf4", "fp4", None])
def test_sharded_load_equals_load_then_wrap(one_rank: None, tiny_dir: Path, quantize: str | None) -> None:
    ref = from_pretrained(tiny_dir, quantize=quantize)
    _prepare(ref)
    fsdp = FSDP()
    got = fsdp.load(tiny_dir, quantize, prepare=_prepare)
    assert (sum(isinstance(m, FlatLinear4bit) for m in got.modules()) == 14) == (quantize is not None)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3], [4, 4, 8, 2, 250, 1]])
    want = _logits(FSDP(), ref, ids)
    assert torch.equal(_logits(fsdp, got, ids), want)
    got_adapter = {n: p.full_tensor() for n, p in got.named_parameters() if p.requires_grad}
    ref_adapter = {n: p.full_tensor() for n, p in ref.named_parameters() if p.requires_grad}
    assert got_adapter.keys() == ref_adapter.keys() and len(got_adapter) == 2 * len(TARGETS) * 2
    for name, value in got_adapter.items():
        assert torch.equal(value, ref_adapter[name]), name  # the same random draws as after from_pretrained


def test_sharded_load_refuses_what_it_cannot_fill(one_rank: None, tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"quantize='int8'"):
        FSDP().load(tiny_dir, "int8")
    for quantize, lora in [("nf4", {"use_dora": True}), (None, {"init": "pissa"}), (None, {"init": "olora"})]:
        with pytest.raises(ValueError, match=r"prepare\(\) failed on the model before its weights are loaded"):
            FSDP().load(tiny_dir, quantize, prepare=lambda m, lora=lora: _prepare(m, **lora))  # they read the base
    with pytest.raises(ValueError, match=r"adapter 'default' has modules_to_save=\['lm_head'\], which copies"):
        FSDP().load(tiny_dir, "nf4", prepare=lambda m: _prepare(m, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"left trainable tensors on the meta device: \['lm_head\.lora_A"):
        FSDP().load(tiny_dir, "nf4", prepare=lambda m: add_lora(m, r=2, target_modules=["lm_head"]))  # not streamed
    save_quantized(from_pretrained(tiny_dir, quantize="nf4"), tmp_path / "q")
    with pytest.raises(ValueError, match=r"config.json: FSDP.load reads float checkpoints"):
        FSDP().load(tmp_path / "q", None)
