"""Targeting with peft's rules (compared module by module with peft), freezing, and the 8B parameter count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from minilora.lora import LoRAConfig, find_targets
from tests.lora.lora_testutil import hf_model

peft = pytest.importorskip("peft")

TARGETING = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["model.layers.1.mlp.up_proj", "o_proj"]),
    dict(target_modules=r".*\.(gate|down)_proj"),
    dict(target_modules=r"(q|k)_proj"),  # must fullmatch the full name: matches nothing
    dict(target_modules="all-linear"),
    dict(target_modules="ALL-LINEAR", exclude_modules=r".*mlp.*"),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers"),
    dict(target_modules=["lm_head", "q_proj"]),
]


@pytest.mark.parametrize("kw", TARGETING, ids=[str(i) for i in range(len(TARGETING))])
def test_targets_equal_peft(tiny_llama_dir: Path, kw: dict) -> None:
    model = hf_model(tiny_llama_dir)
    ours = find_targets(model, LoRAConfig(**kw))
    try:
        peft_model = peft.get_peft_model(hf_model(tiny_llama_dir), peft.LoraConfig(**kw))
    except ValueError as e:  # peft refuses configs that match nothing
        assert "not found in the base model" in str(e) or "matched" in str(e), e
        assert ours == []
        with pytest.raises(ValueError, match="matched no Linear"):
            ml.add_lora(model, **{"target_modules": kw["target_modules"]})
        return
    theirs = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    ]
    assert ours == theirs


def test_only_adapters_train_and_second_adapter_switches(tiny_llama_dir: Path) -> None:
    model = ml.add_lora(hf_model(tiny_llama_dir), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    ml.add_lora(model, r=2, alpha=2, target_modules=["q_proj", "up_proj"], adapter_name="second")
    assert ml.active_adapter(model) == "default"
    assert all("default" in n for n, p in model.named_parameters() if p.requires_grad)
    ml.set_adapter(model, "second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all(".second." in n for n in trainable)
    with pytest.raises(ValueError, match="no adapter named"):
        ml.set_adapter(model, "third")


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoRAConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        LoRAConfig.from_peft_dict({"r": 8, "target_modules": ["q_proj"], "fan_in_fan_out": True})
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRAConfig.from_peft_dict({"r": 8, "target_modules": ["q_proj"], "init_lora_weights": "corda"})


LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
EXPECTED_8B = "trainable params: 27,262,976 || all params: 8,057,524,224 || trainable%: 0.3384"


def _meta_transformers_8b() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))


def _meta_minilora_8b() -> torch.nn.Module:
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaForCausalLM

    config = ModelConfig.from_dict({"model_type": "llama", **LLAMA_31_8B})
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "build",
    [_meta_transformers_8b, _meta_minilora_8b],
)
def test_llama31_8b_counts_on_meta(build) -> None:
    model = build()
    assert ml.count_parameters(model)[1] == 8_030_261_248
    ml.add_lora(model, r=32, alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert ml.print_trainable_parameters(model) == EXPECTED_8B
    assert ml.adapter_nbytes(model) == 109_051_904
    assert f"{ml.adapter_nbytes(model) / 1e6:.2f} MB" == "109.05 MB"
