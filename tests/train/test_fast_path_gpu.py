"""The default training path on CUDA (compiled blocks + one CUDA graph per step + packed rows).

`pytest -m gpu tests/train/test_fast_path_gpu.py`: with no speed flags, train() on a CUDA model takes the
fast path and says so; its 20-step losses equal the eager reference loop's on the same packed rows within
bf16 tolerance; a packed example's logits through the compiled blocks equal the example run alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from minilora.loading import from_pretrained
from minilora.lora import add_lora
from minilora.train import loop
from minilora.train.data import collate_packed, tokenize_records
from minilora.train.fast import compile_blocks, document_ids, pack_first_fit
from minilora_demo.price import split_products

pytestmark = pytest.mark.gpu


def _examples(byte_tok, n: int = 48) -> list:
    train_p, _, _ = split_products(n, 4, 0, seed=1)
    return tokenize_records([p.record() for p in train_p], byte_tok, max_length=160).examples


def _model(tiny_dir: Path):
    model = from_pretrained(tiny_dir, quantize="nf4").to("cuda")
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=0.0)
    return model


def _run(tiny_dir: Path, byte_tok, out: Path, **kw) -> loop.TrainResult:
    config = loop.TrainConfig(
        output_dir=str(out), max_steps=20, batch_size=4, lr=1e-3, gradient_checkpointing=True,
        progress=False, plot=False, **kw,
    )  # fmt: skip
    return loop.train(_model(tiny_dir), _examples(byte_tok), config)


def test_default_fast_path_follows_the_eager_reference(tiny_dir: Path, byte_tok, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="minilora.train.loop"):
        fast = _run(tiny_dir, byte_tok, tmp_path / "fast")
    assert fast.path.startswith("compiled blocks + whole step as one CUDA graph + packed rows of ")
    assert any("training path: compiled blocks" in r.getMessage() for r in caplog.records)
    assert fast.warmup_s is not None and fast.warmup_s > 0
    eager = _run(tiny_dir, byte_tok, tmp_path / "eager", fast=False, packing=True)
    assert eager.path == fast.path.split(" + ")[-1]
    assert len(fast.losses) == len(eager.losses) == 20
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(eager.losses), rtol=2e-2, atol=2e-2)
    assert fast.losses[-1] < fast.losses[0]


def test_packed_logits_through_compiled_blocks(tiny_dir: Path, byte_tok) -> None:
    model = _model(tiny_dir).eval()
    ex = _examples(byte_tok, 8)[:3]
    row = pack_first_fit(ex, sum(len(e.input_ids) for e in ex))
    batch = collate_packed(row).to("cuda")
    with torch.no_grad():
        alone = [model(torch.tensor([e.input_ids], device="cuda")) for e in ex]
        compile_blocks(model)
        packed = model(batch.input_ids, position_ids=batch.position_ids, document_ids=document_ids(batch.position_ids))
    starts = [i for i, p in enumerate(row[0].position_ids) if p == 0] + [len(row[0].input_ids)]
    for a, b in zip(starts, starts[1:], strict=False):
        want = next(x for x, e in zip(alone, ex, strict=True) if e.input_ids == row[0].input_ids[a:b])
        torch.testing.assert_close(packed[:, a:b], want, rtol=1e-4, atol=1e-4)
