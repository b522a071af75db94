"""Merging into a 4-bit base: the per-layer requantization error equals an independent computation with
bitsandbytes' own quantizer, and the safer options (bf16, keep) stay close to the unmerged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from minilora.errors import AdapterError
from minilora.lora.merge4bit import format_report, merge, requantization_report
from tests.lora.lora_testutil import (
    assert_logits_close,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)


def quantized_model(path: Path) -> torch.nn.Module:
    model = ml.add_lora(minilora_model(path, quantize="nf4"), r=8, alpha=16, target_modules="all-linear")
    randomize_adapters(model, seed=3)
    return model


@torch.no_grad()
def test_reported_error_equals_bitsandbytes_requantization(tiny_llama_dir: Path) -> None:
    bnbF = pytest.importorskip("bitsandbytes.functional")
    model = quantized_model(tiny_llama_dir)
    reports = requantization_report(model)
    assert len(reports) == 14
    for report in reports:
        layer = model.get_submodule(report.module)
        base = layer.base_layer
        # independently: W0 + s B A from the raw tensors, requantized by bitsandbytes with the same settings
        target = base.dequantize().float() + layer.settings["default"].scaling * (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        )
        packed, state = bnbF.quantize_4bit(target, blocksize=base.blocksize, compress_statistics=True, quant_type="nf4")
        error = bnbF.dequantize_4bit(packed, state).float() - target
        assert report.max_abs_error == pytest.approx(error.abs().max().item(), rel=1e-6)
        assert report.rel_error == pytest.approx((error.norm() / target.norm()).item(), rel=1e-6)
    merged = ml.merge_adapters(model)  # the in-place merge reports the same figures
    assert [(r.module, r.rel_error) for r in merged] == [(r.module, r.rel_error) for r in reports]
    assert "max_abs_error" in format_report(reports).splitlines()[0]


@torch.no_grad()
def test_safer_options(tiny_llama_dir: Path) -> None:
    ids = input_ids()
    model = quantized_model(tiny_llama_dir)
    unmerged = logits(model, ids)
    kept, reports = merge(model, how="keep")
    torch.testing.assert_close(logits(kept, ids), unmerged, rtol=0, atol=0)
    assert len(reports) == 14
    as_bf16, _ = merge(model, how="bf16")
    assert as_bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert_logits_close(logits(as_bf16, ids).float(), unmerged, rel=2e-2)
    with pytest.raises(AdapterError, match="how="):
        merge(as_bf16, how="fp8")
