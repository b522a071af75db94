"""ModelConfig: both rope spellings, family differences, refusals, a config.json transformers reads back."""

import json

import pytest
import torch

from minilora.models.config import ModelConfig
from minilora.models.llama import rope_inv_freq

BASE = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_v4_and_v5_rope_keys_agree():
    v4 = ModelConfig.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA31_SCALING}}
    )
    v4_type = ModelConfig.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA31_SCALING}}
    )
    v5 = ModelConfig.from_dict(
        {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA31_SCALING}}
    )
    for cfg in (v4, v4_type, v5):
        assert (cfg.rope_type, cfg.rope_theta, cfg.rope_scaling) == ("llama3", 500000.0, LLAMA31_SCALING)
    plain = ModelConfig.from_dict({**BASE, "rope_theta": 10000.0, "rope_scaling": None})
    assert (plain.rope_type, plain.rope_scaling, plain.head_dim) == ("default", {}, 16)


def test_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in ({"rope_type": "llama3", **LLAMA31_SCALING}, {"rope_type": "linear", "factor": 2.0}):
        hf_config = transformers.LlamaConfig(
            **{k: v for k, v in BASE.items() if k != "model_type"},
            rope_theta=500000.0,
            rope_scaling=dict(scaling),
        )
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
        ours = rope_inv_freq(ModelConfig.from_dict(hf_config.to_dict()))
        torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


def test_family_differences():
    qwen = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert (qwen.attention_bias, qwen.o_proj_bias, qwen.sliding_window) == (True, False, None)
    qwen_sw = ModelConfig.from_dict(
        {
            **BASE,
            "model_type": "qwen2",
            "sliding_window": 8,
            "use_sliding_window": True,
            "max_window_layers": 1,
        }
    )
    assert qwen_sw.layer_sliding_windows == [None, 8]
    mistral = ModelConfig.from_dict({**BASE, "model_type": "mistral"})
    assert mistral.layer_sliding_windows == [4096, 4096]  # transformers' default when the key is absent
    assert ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    llama = ModelConfig.from_dict({**BASE, "attention_bias": True, "num_key_value_heads": None})
    assert (llama.attention_bias, llama.o_proj_bias, llama.num_key_value_heads) == (True, True, 4)


def test_unknown_model_type_names_type_and_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"gpt2.*") as info:
        ModelConfig.from_json(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear"}}, "factor"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_bad_configs_are_refused(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig.from_dict({**BASE, **change}, source="x/config.json")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_written_config_reads_back_in_transformers_and_minilora(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    extra = {"rope_scaling": {"type": "linear", "factor": 2.0}, "tie_word_embeddings": True}
    cfg = ModelConfig.from_dict({**BASE, "model_type": family, **extra})
    cfg.to_json(tmp_path / "config.json")
    again = ModelConfig.from_json(tmp_path)
    assert {k: v for k, v in again.__dict__.items() if k != "raw"} == {
        k: v for k, v in cfg.__dict__.items() if k != "raw"
    }
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == family
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 2.0
    assert hf.tie_word_embeddings and hf.num_key_value_heads == 2
