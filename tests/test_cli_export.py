"""`minilora export`: merge an adapter and write safetensors (loads in transformers, same logits) or GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from minilora.cli import main
from minilora.io.gguf_format import read_gguf
from minilora.loading import from_pretrained


def test_export_both_formats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import LlamaForCausalLM

    from minilora.testing.tiny import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    model = ml.add_lora(from_pretrained(model_dir), r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ml.save_adapter(model, tmp_path / "adapter")
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        expected = model.eval()(ids)

    out = tmp_path / "hf"
    argv = ["export", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert main([*argv, "--format", "safetensors"]) == 0
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    gguf_out = tmp_path / "m.gguf"
    argv = ["export", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(gguf_out)]
    assert main([*argv, "--type", "Q8_0"]) == 0
    assert read_gguf(gguf_out).tensors["blk.0.attn_q.weight"].ggml_type.name == "Q8_0"
    assert main(["export", str(model_dir), "--out", str(model_dir / "inside")]) == 1  # never over an input
    assert "overlaps the input" in capsys.readouterr().err
