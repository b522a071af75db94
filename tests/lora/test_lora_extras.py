"""modules_to_save, trainable_token_indices and LoRA+ against peft 0.21: same saved keys, same logits both
ways, same optimizer groups and the same training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora.lora as ml
from minilora.errors import AdapterError
from minilora.lora.loraplus import create_loraplus_optimizer
from tests.lora.lora_testutil import (
    assert_logits_close,
    hf_model,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)

peft = pytest.importorskip("peft")

CASES = {
    "modules-to-save": dict(modules_to_save=["lm_head", "embed_tokens"]),
    "token-indices": dict(trainable_token_indices=[3, 5, 7]),
    "token-indices-dict": dict(trainable_token_indices={"embed_tokens": [0, 255]}),
}
BASES = [
    "transformers",
    "minilora",
]


@torch.no_grad()
def perturb_full_modules(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trained-in-full tensor (modules_to_save copies, new token rows) away from its start."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "modules_to_save" in name or "trainable_tokens_delta" in name:
            param.add_(0.5 * torch.randn(param.shape, generator=gen))


def lora_config(case: str) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **CASES[case])


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_round_trip_both_ways(tiny_llama_dir: Path, tmp_path: Path, case: str, base: str) -> None:
    ids = input_ids()
    ref = peft.get_peft_model(hf_model(tiny_llama_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_config(case)))
    randomize_adapters(ref, seed=1)
    perturb_full_modules(ref, seed=2)
    ref.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = logits(ref.eval(), ids)
    ours_base = hf_model(tiny_llama_dir) if base == "transformers" else minilora_model(tiny_llama_dir)
    ours = ml.load_adapter(ours_base, tmp_path / "peft").eval()
    with torch.no_grad():
        assert_logits_close(logits(ours, ids), expected)
    ml.save_adapter(ours, tmp_path / "ours")
    mine, theirs = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)
    back = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(logits(back, ids), expected)
        with ml.disable_adapters(ours):  # the wrappers step aside too
            assert_logits_close(logits(ours, ids), logits(hf_model(tiny_llama_dir), ids))


def test_only_the_listed_rows_train(tiny_llama_dir: Path) -> None:
    model = ml.add_lora(
        hf_model(tiny_llama_dir), r=2, alpha=2, target_modules=["q_proj"], trainable_token_indices=[4, 9]
    )
    delta = model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert delta.requires_grad and not model.model.embed_tokens.weight.requires_grad
    logits(model, input_ids()).sum().backward()
    assert delta.grad is not None and delta.grad.shape == (2, 64)
    with pytest.raises(AdapterError, match="need indices in"):
        ml.add_lora(hf_model(tiny_llama_dir), target_modules=["q_proj"], trainable_token_indices=[300])


def test_merge_and_unload_keeps_trained_full_modules(tiny_llama_dir: Path) -> None:
    model = ml.add_lora(
        hf_model(tiny_llama_dir),
        r=2,
        alpha=2,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        trainable_token_indices=[1, 2],
    )
    randomize_adapters(model)
    perturb_full_modules(model)
    ids = input_ids()
    with torch.no_grad():
        expected = logits(model.eval(), ids)
        merged = ml.merge_and_unload(model)
        assert isinstance(merged.lm_head, torch.nn.Linear) and isinstance(merged.model.embed_tokens, torch.nn.Embedding)
        assert_logits_close(logits(merged, ids), expected)


def test_loraplus_groups_and_step_equal_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
    )
    ref = peft.get_peft_model(hf_model(tiny_llama_dir), config)
    randomize_adapters(ref, seed=3)
    ref.save_pretrained(tmp_path)
    ours = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path, trainable=True)
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    opt_ref = peft_loraplus(ref, torch.optim.AdamW, **kwargs)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (g["lr"], g["weight_decay"], len(g["params"])) for g in opt_ref.param_groups
    ]
    ids = input_ids()
    for model, optimizer in ((ref, opt_ref), (ours, opt)):
        for _ in range(2):
            optimizer.zero_grad()
            logits(model, ids).square().mean().backward()
            optimizer.step()
    ref_state = peft.get_peft_model_state_dict(ref)
    ours_state = ml.adapter_state_dict(ours)
    assert ours_state.keys() == ref_state.keys()
    for key, value in ours_state.items():
        torch.testing.assert_close(value, ref_state[key], atol=1e-6, rtol=1e-5, msg=key)
