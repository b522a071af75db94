"""minilora.memory: the footprint from a config alone, against transformers' get_memory_footprint.

The Llama-3.1-8B figures come from formats.md section 4 (and the QLoRA notes); the byte-exact checks load
tiny random checkpoints with transformers + bitsandbytes on CPU and compare with the real
``get_memory_footprint``, and the true bytes with bitsandbytes' own quant state and minilora's loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minilora.memory import describe, footprint, footprint_report
from minilora.models.config import ModelConfig

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("llama31-8b")
    (d / "config.json").write_text(json.dumps(LLAMA31_8B))
    return d


def test_llama31_8b_figures(llama8b_dir: Path) -> None:
    fp = footprint(llama8b_dir)
    assert fp.params == 8_030_261_248
    assert fp.decoder_linear_params == 6_979_321_856
    assert fp.lora_params == 27_262_976
    assert fp.line("fp32").transformers_param_bytes == 32_121_044_992
    assert fp.line("int8").transformers_param_bytes == 9_081_200_640
    assert fp.line("nf4+dq").transformers_param_bytes == 5_591_539_712
    assert fp.line("nf4").transformers_param_bytes == 5_591_539_712
    assert fp.line("nf4+dq+lora").transformers_param_bytes == 5_591_539_712 + 109_051_904
    # get_memory_footprint() adds transformers' two float32 RoPE buffers (64 values each)
    assert fp.line("nf4+dq").transformers_bytes == 5_591_539_712 + 512
    # True NF4+DQ bytes: + uint8 absmax per 64, float32 nested absmax per 256 blocks, tables and offset.
    n_blocks = 6_979_321_856 // 64
    extra = n_blocks + n_blocks // 256 * 4 + 224 * (64 + 1024 + 4)  # 224 = 32 layers x 7 Linears
    assert fp.line("nf4+dq").true_bytes - fp.line("nf4+dq").transformers_bytes == extra
    assert 0.10e9 < extra < 0.12e9  # "about 0.11 GB higher"
    assert fp.line("nf4").quant_state_bytes == n_blocks * 4 + 224 * 64
    assert fp.line("int8").quant_state_bytes == 32 * 4 * (4096 * 2 + 1024 * 2 + 14336 * 2 + 4096)
    # the breakdown adds up
    for line in fp.lines:
        assert sum(line.breakdown_true.values()) == line.true_bytes
        assert sum(line.breakdown_transformers.values()) == line.transformers_bytes


def test_llama31_8b_report_prints_the_figures(llama8b_dir: Path) -> None:
    report = footprint_report(llama8b_dir / "config.json")
    for text in ("32.1 GB", "9.08 GB", "5.59 GB", "5,591,539,712", "5.70 GB", "8,030,261,248", "27,262,976"):
        assert text in report, text
    for group in ("embeddings", "attention", "mlp", "norms", "head", "lora"):
        assert f"| {group} |" in report


def test_config_sources_agree(llama8b_dir: Path) -> None:
    # v5 spelling of the rope keys, a ModelConfig and a dict all give the same bytes
    v5 = dict(LLAMA31_8B)
    scaling = v5.pop("rope_scaling")
    v5["rope_parameters"] = {**scaling, "rope_theta": v5.pop("rope_theta")}
    expected = footprint(llama8b_dir).line("nf4+dq").true_bytes
    assert footprint(v5).line("nf4+dq").true_bytes == expected
    assert footprint(ModelConfig.from_dict(LLAMA31_8B)).line("nf4+dq").true_bytes == expected


def test_bad_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        footprint(tmp_path / "nothing-here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="not-a-cached/model"):
        footprint("not-a-cached/model")
    bad = dict(LLAMA31_8B, model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="gpt2"):
        footprint(tmp_path)


# ------------------------------------------------------------------ against the real transformers count
def _tiny_checkpoint(directory: Path, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_count_is_exact(tmp_path: Path, tied: bool) -> None:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    d = _tiny_checkpoint(tmp_path, tied)
    fp = footprint(d)
    bf16 = torch.bfloat16
    loads = {
        "fp32": dict(dtype=torch.float32),
        "bf16": dict(dtype=bf16),
        "int8": dict(dtype=bf16, quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
        "nf4": dict(
            dtype=bf16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16
            ),
        ),
        "nf4+dq": dict(
            dtype=bf16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=bf16,
            ),
        ),
    }
    for name, kwargs in loads.items():
        model = LlamaForCausalLM.from_pretrained(d, **kwargs)
        line = fp.line(name)
        assert model.get_memory_footprint() == line.transformers_bytes, name
        assert model.get_memory_footprint(return_buffers=False) == line.transformers_param_bytes, name
        if name.startswith("nf4"):
            # true bytes: the same count plus bitsandbytes' own quant state of every 4-bit weight
            state = 0
            for p in model.parameters():
                qs = getattr(p, "quant_state", None)
                if qs is None:
                    continue
                state += qs.absmax.nbytes + qs.code.nbytes
                if qs.nested:
                    state += qs.state2.absmax.nbytes + qs.state2.code.nbytes + qs.offset.nbytes
            assert line.true_bytes == line.transformers_bytes + state, name
        if name == "int8":
            scb = sum(m.weight.SCB.nbytes for m in model.modules() if hasattr(m, "weight") and hasattr(m.weight, "SCB"))
            assert scb > 0
            assert line.true_bytes == line.transformers_bytes + scb


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_true_bytes_match_a_minilora_quantized_model(tmp_path: Path, quantize: str) -> None:
    from minilora.loading import from_pretrained
    from minilora.nn import quantized_nbytes

    d = _tiny_checkpoint(tmp_path, tied=False)
    model = from_pretrained(d, quantize=quantize, double_quant=True, dtype=torch.bfloat16)
    counted, true = quantized_nbytes(model)
    line = footprint(d).line("nf4+dq" if quantize == "nf4" else "int8")
    # minilora keeps one RoPE buffer where transformers keeps two
    ours = sum(b.nbytes for b in model.buffers() if b.dtype.is_floating_point and b.dim() == 1 and b.numel() == 8)
    rope = line.breakdown_true["buffers"]
    assert true == line.true_bytes - rope + ours
    assert counted == line.transformers_bytes - rope + ours
    # describe() counts a quantized weight as its out x in parameters and its true bytes
    first = describe(model).splitlines()[0]
    assert f"[{footprint(d).params:,} params" in first


def test_describe_shows_tree_with_counts(tmp_path: Path) -> None:
    from minilora.models.llama import LlamaForCausalLM

    config = ModelConfig.from_json(_tiny_checkpoint(tmp_path, tied=True) / "config.json")
    model = LlamaForCausalLM(config)
    text = describe(model)
    total = sum(p.numel() for p in model.parameters())
    assert f"[{total:,} params" in text.splitlines()[0]
    assert "(0-1): DecoderLayer  [each " in text
    assert "(q_proj): Linear(in_features=64, out_features=64" in text
    assert "(embed_tokens): Embedding(320, 64)  [20,480 params" in text
