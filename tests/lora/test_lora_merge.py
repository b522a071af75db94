"""Model-level merge / unmerge and merge_and_unload to a checkpoint transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from tests.lora.lora_testutil import (
    assert_logits_close,
    hf_model,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_unmerged_on_float_base(tiny_llama_dir: Path, use_dora: bool) -> None:
    model = ml.add_lora(hf_model(tiny_llama_dir), r=8, alpha=16, target_modules="all-linear", use_dora=use_dora)
    randomize_adapters(model, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        unmerged = logits(model, input_ids())
        reports = ml.merge_adapters(model)
        assert len(reports) == 14 and all(r.max_abs_error == 0.0 for r in reports)
        assert_logits_close(logits(model, input_ids()), unmerged)
        ml.unmerge_adapters(model)
        assert_logits_close(logits(model, input_ids()), unmerged)
    for key, value in model.state_dict().items():
        if key in before:
            torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_loads_in_transformers(tiny_llama_dir: Path, tmp_path: Path, quantize: str | None) -> None:
    from minilora.io.checkpoint import save_pretrained

    model = ml.add_lora(minilora_model(tiny_llama_dir, quantize=quantize), r=8, alpha=16, target_modules="all-linear")
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        with_adapter = logits(model, input_ids())
    merged = ml.merge_and_unload(model)
    assert not ml.lora_layers(merged) and not hasattr(merged, "lora_configs")
    with torch.no_grad():
        merged_logits = logits(merged, input_ids())
    assert_logits_close(merged_logits, with_adapter)
    save_pretrained(merged, tmp_path / "merged")
    reloaded = hf_model(tmp_path / "merged")
    assert not any("lora" in k or "base_layer" in k for k in reloaded.state_dict())
    with torch.no_grad():
        assert_logits_close(logits(reloaded, input_ids()), merged_logits)


def test_merge_into_nf4_model_reports_errors(tiny_llama_dir: Path) -> None:
    model = ml.add_lora(minilora_model(tiny_llama_dir, quantize="nf4"), r=8, alpha=16, target_modules="all-linear")
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        unmerged = logits(model, input_ids())
        reports = ml.merge_adapters(model)
        assert len(reports) == 14 and all(r.quantized and 0 < r.rel_error < 0.2 for r in reports)
        assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
        merged = logits(model, input_ids())
        assert (merged - unmerged).abs().max() > 0  # requantization is lossy (bounded per layer in test_lora_qlora)
        ml.unmerge_adapters(model)
        torch.testing.assert_close(logits(model, input_ids()), unmerged, rtol=0, atol=0)
