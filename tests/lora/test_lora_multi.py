"""Several adapters on one model against peft 0.21: load, switch, disable, delete, weighted combinations,
and peft's directory layout (the "default" adapter at the top, the others in subdirectories)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from minilora.errors import AdapterError
from minilora.lora.multi import add_weighted_adapter, delete_adapter, load_adapters, save_adapters
from tests.lora.lora_testutil import ATTN, assert_logits_close, hf_model, input_ids, logits, randomize_adapters

peft = pytest.importorskip("peft")


def peft_two_adapters(path: Path) -> torch.nn.Module:
    model = peft.get_peft_model(
        hf_model(path), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ATTN)
    )
    model.add_adapter(
        "other", peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    )
    randomize_adapters(model, seed=2)
    return model.eval()


def test_load_switch_disable_delete_like_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ref = peft_two_adapters(tiny_llama_dir)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    ours = hf_model(tiny_llama_dir)
    assert load_adapters(ours, tmp_path) == ["default", "other"]
    ids = input_ids()
    with torch.no_grad():
        for name in ("default", "other"):
            ref.set_adapter(name)
            ml.set_adapter(ours, name)
            assert_logits_close(logits(ours, ids), logits(ref, ids))
        with ref.disable_adapter(), ml.disable_adapters(ours):
            assert_logits_close(logits(ours, ids), logits(ref, ids))
        ref.delete_adapter("other")
        delete_adapter(ours, "other")
        assert ml.active_adapter(ours) == "default" and sorted(ours.lora_configs) == ["default"]
        assert_logits_close(logits(ours, ids), logits(ref, ids))
    assert not any("other" in k for k in ours.state_dict())
    with pytest.raises(AdapterError, match="no adapter named"):
        delete_adapter(ours, "other")


def test_peft_loads_our_layout(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ours = ml.add_lora(hf_model(tiny_llama_dir), r=4, alpha=8, target_modules=ATTN)
    ml.add_lora(ours, r=2, alpha=4, target_modules=["v_proj", "down_proj"], adapter_name="second")
    randomize_adapters(ours, seed=5)
    save_adapters(ours, tmp_path)
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path)
    ref.load_adapter(tmp_path / "second", adapter_name="second")
    ids = input_ids()
    with torch.no_grad():
        for name in ("default", "second"):
            ref.set_adapter(name)
            ml.set_adapter(ours, name)
            assert_logits_close(logits(ours.eval(), ids), logits(ref.eval(), ids))


@pytest.mark.parametrize("combination_type,svd_rank", [("linear", None), ("svd", None), ("svd", 3)])
def test_weighted_adapter_equals_peft(tiny_llama_dir: Path, tmp_path: Path, combination_type: str, svd_rank) -> None:
    ref = peft_two_adapters(tiny_llama_dir)
    ref.save_pretrained(tmp_path)
    ours = hf_model(tiny_llama_dir)
    load_adapters(ours, tmp_path)
    args = (["default", "other"], [0.7, -0.4], "mix")
    ref.add_weighted_adapter(*args, combination_type=combination_type, svd_rank=svd_rank)
    add_weighted_adapter(ours, *args, combination_type=combination_type, svd_rank=svd_rank)
    theirs = peft.get_peft_model_state_dict(ref, adapter_name="mix")
    mine = ml.adapter_state_dict(ours, "mix")
    assert mine.keys() == theirs.keys()
    for key in mine:  # the SVD's sign is fixed by the same LAPACK call on the same matrix
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=0, msg=key)
    ref.set_adapter("mix")
    ml.set_adapter(ours, "mix")
    with torch.no_grad():
        assert_logits_close(logits(ours.eval(), input_ids()), logits(ref, input_ids()))
    ml.save_adapter(ours, tmp_path / "mix_ours", adapter_name="mix")
    assert ml.read_adapter_config(tmp_path / "mix_ours").r == (svd_rank or 4)
