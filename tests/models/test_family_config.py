"""The family readers (minilora.models.families): transformers' defaults, both RoPE spellings, refusals."""

import pytest
import torch

from minilora.errors import ConfigError
from minilora.models.config import ModelConfig
from minilora.models.llama import LlamaForCausalLM
from minilora.models.rope import rope_inv_freq

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.mark.parametrize(
    ("config_cls", "expected"),
    [
        ("Qwen3Config", dict(qk_norm=True, head_dim=128, sliding_window=None, hidden_act="silu")),
        (
            "Gemma2Config",
            dict(
                attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0,
                query_pre_attn_scalar=256.0,
                sliding_window=4096,
                hidden_act="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                sandwich_norm=True,
                norm_unit_offset=True,
            ),
        ),
        ("Gemma3TextConfig", dict(rope_theta=1_000_000.0, rope_local_theta=10000.0, qk_norm=True)),
        ("Phi3Config", dict(fused_qkv=True, fused_gate_up=True, partial_rotary_factor=1.0, rms_norm_eps=1e-5)),
    ],
)
def test_transformers_defaults_are_read(config_cls: str, expected: dict) -> None:
    hf = getattr(transformers, config_cls)(**SMALL)
    cfg = ModelConfig.from_dict(hf.to_dict())
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    if config_cls == "Gemma2Config":  # every other layer slides, starting with layer 0
        assert cfg.layer_sliding_windows == [4096, None] * 3
    if config_cls == "Gemma3TextConfig":  # five local layers, then a global one
        assert cfg.layer_local_rope == [True] * 5 + [False]


def test_gemma3_v4_rope_keys_equal_v5_per_layer_type() -> None:
    v4 = ModelConfig.from_dict(
        {
            "model_type": "gemma3_text",
            **SMALL,
            "rope_theta": 500000.0,
            "rope_local_base_freq": 1000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    v5 = ModelConfig.from_dict(
        {
            "model_type": "gemma3_text",
            **SMALL,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        }
    )
    for cfg in (v4, v5):
        assert (cfg.rope_type, cfg.rope_theta, cfg.rope_scaling, cfg.rope_local_theta) == (
            "linear",
            500000.0,
            {"factor": 8.0},
            1000.0,
        )


def test_phi3_partial_rotary_and_longrope_frequencies_match_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.Phi3Config(
        **SMALL,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]},
    )
    cfg = ModelConfig.from_dict(hf.to_dict())
    assert cfg.rotary_dim == 4
    for long in (False, True):
        expected, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=17 if long else None)
        torch.testing.assert_close(rope_inv_freq(cfg, long=long), expected, rtol=0, atol=0)


def test_refusals_name_the_key() -> None:
    base = {"model_type": "phi3", **SMALL}
    with pytest.raises(ConfigError, match="longrope.*short_factor"):
        ModelConfig.from_dict({**base, "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 4}})
    bad = ModelConfig.from_dict(
        {**base, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}}
    )
    with pytest.raises(ConfigError, match="short_factor has 3 values, need 4"):
        LlamaForCausalLM(bad)
    with pytest.raises(ConfigError, match="hidden_act 'relu'"):
        ModelConfig.from_dict({**base, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="rotary dimension"):
        ModelConfig.from_dict({**base, "partial_rotary_factor": 0.1})
    with pytest.raises(ConfigError, match="unknown types"):
        ModelConfig.from_dict({"model_type": "gemma2", **SMALL, "layer_types": ["chunked_attention"] * 6})
    with pytest.raises(ConfigError, match="unknown layer types"):
        ModelConfig.from_dict({"model_type": "gemma3_text", **SMALL, "rope_parameters": {"local": {}}})
