"""`minilora footprint` for Phi-3, Gemma-2/3 and Qwen3 against transformers' own counts.

The published configs (config.json of Phi-3-medium-4k-instruct, gemma-2-9b, Qwen3-8B, gemma-3-270m) are
written here; transformers builds each model on the meta device (no memory) and its
``get_memory_footprint`` and parameter count are compared with minilora's fp32 and bf16 lines. The
quantized lines are checked byte for byte on tiny checkpoints loaded by transformers + bitsandbytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minilora.cli import main
from minilora.memory import footprint

transformers = pytest.importorskip("transformers")

PHI3_MEDIUM = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 17920,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 10,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "vocab_size": 256000,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA3_270M = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}
PUBLISHED = {"phi3-medium": PHI3_MEDIUM, "gemma2-9b": GEMMA2_9B, "qwen3-8b": QWEN3_8B, "gemma3-270m": GEMMA3_270M}
# Parameter counts (the published model cards round them: 14B, 9B, 8.2B, 270M).
PARAMS = {
    "phi3-medium": 13_960_238_080,
    "gemma2-9b": 9_241_705_984,
    "qwen3-8b": 8_190_735_360,
    "gemma3-270m": 268_098_176,
}


def meta_transformers_model(config_json: dict, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**config_json)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_match_transformers_counts(name: str) -> None:
    fp = footprint(dict(PUBLISHED[name]))
    for line, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = meta_transformers_model(PUBLISHED[name], dtype)
        assert fp.params == model.num_parameters() == PARAMS[name]
        assert fp.line(line).transformers_bytes == model.get_memory_footprint(), line
        assert fp.line(line).transformers_param_bytes == model.get_memory_footprint(return_buffers=False), line
    linears = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"  # what bitsandbytes replaces
    )
    assert fp.decoder_linear_params == linears


def test_footprint_command_prints_the_phi3_medium_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MEDIUM))
    assert main(["footprint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "13,960,238,080 parameters" in out
    assert f"{footprint(tmp_path).line('nf4+dq').transformers_param_bytes:,}" in out


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3"])
def test_quantized_counts_equal_transformers_bitsandbytes(tmp_path: Path, family: str) -> None:
    pytest.importorskip("bitsandbytes")
    from tests.models.family_testutil import tiny_family_model

    tiny_family_model(family).save_pretrained(tmp_path)
    fp = footprint(tmp_path)
    bf16 = torch.bfloat16
    loads = {
        "bf16": None,
        "int8": transformers.BitsAndBytesConfig(load_in_8bit=True),
        "nf4+dq": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16
        ),
    }
    for line, qc in loads.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=bf16, quantization_config=qc)
        assert fp.line(line).transformers_bytes == model.get_memory_footprint(), line
