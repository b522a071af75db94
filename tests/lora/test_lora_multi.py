"""Several adapters on one model against peft 0.21: load, switch, disable, delete, weighted combinations,
and peft's directory layout (the "default" adapter at the top, the others in subdirectories)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minilora.lora as ml
from minilora.errors import AdapterError
from minilora.lora.multi import add_weighted_adapter, delete_adapter, load_adapters, save_adapters
from tests.lora.lora_testutil import (
    ATTN,
    assert_logits_close,
    hf_model,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)

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


ROWS = ["other", "__base__", "default", "other"]  # peft's mixed-adapter batch: one adapter per row


def test_mixed_batch_equals_peft_adapter_names(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Each row through its own adapter, as peft's `model(ids, adapter_names=...)`, on transformers' model
    and on minilora's own decoder (NF4 base too), and each row equal to that adapter run alone."""
    ref = peft_two_adapters(tiny_llama_dir)
    ref.save_pretrained(tmp_path)
    ids = input_ids(batch=len(ROWS))
    with torch.no_grad():
        expected = ref(ids, adapter_names=ROWS).logits
        for ours in (hf_model(tiny_llama_dir), minilora_model(tiny_llama_dir)):
            load_adapters(ours, tmp_path)
            with ml.mixed_batch(ours, ROWS):
                got = logits(ours, ids)
            assert_logits_close(got, expected)
            assert all(layer.row_adapters is None for _, layer in ml.lora_layers(ours))  # the block restores
            for i, name in enumerate(ROWS):  # row i alone, with its adapter set the ordinary way
                if name == "__base__":
                    with ml.disable_adapters(ours):
                        alone = logits(ours, ids[i : i + 1])
                else:
                    ml.set_adapter(ours, name)
                    alone = logits(ours, ids[i : i + 1])
                assert_logits_close(got[i : i + 1], alone)
        nf4 = minilora_model(tiny_llama_dir, quantize="nf4")
        load_adapters(nf4, tmp_path)
        with ml.mixed_batch(nf4, ROWS):
            got = logits(nf4, ids)
        ml.set_adapter(nf4, "other")
        assert_logits_close(got[3:4], logits(nf4, ids[3:4]))


def test_greedy_batch_with_adapter_names_equals_each_prompt_alone(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from minilora.generate import greedy_batch

    peft_two_adapters(tiny_llama_dir).save_pretrained(tmp_path)
    ours = minilora_model(tiny_llama_dir)
    load_adapters(ours, tmp_path)
    prompts = [[5, 9, 17], [3, 4, 5, 6, 7], [100, 2], [8] * 4]
    mixed = greedy_batch(ours, prompts, 6, adapter_names=ROWS)
    for prompt, name, got in zip(prompts, ROWS, mixed, strict=True):
        if name == "__base__":
            with ml.disable_adapters(ours):
                alone = greedy_batch(ours, [prompt], 6)[0]
        else:
            ml.set_adapter(ours, name)
            alone = greedy_batch(ours, [prompt], 6)[0]
        assert got == alone, (name, prompt)
    assert mixed[0] != mixed[1] or mixed[2] != mixed[1]  # the adapters change what is generated
    with pytest.raises(ValueError, match="3 adapter names for 4 prompts"):
        greedy_batch(ours, prompts, 2, adapter_names=ROWS[:3])


def test_mixed_batch_refuses_what_peft_refuses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peft_two_adapters(tiny_llama_dir).save_pretrained(tmp_path)
    ours = minilora_model(tiny_llama_dir)
    load_adapters(ours, tmp_path)
    ids = input_ids(batch=2)
    with pytest.raises(AdapterError, match=r"no adapter named \['sql'\]"):
        with ml.mixed_batch(ours, ["sql", "default"]):
            pass
    with pytest.raises(AdapterError, match="names 4 adapters for 2 rows"), torch.no_grad():
        with ml.mixed_batch(ours, ROWS):
            ours(ids)
    ours.train()
    with pytest.raises(AdapterError, match="training mode"):
        with ml.mixed_batch(ours, ["default", "other"]):
            pass
    ours.eval()
    ml.add_lora(ours, r=2, alpha=2, target_modules=["q_proj"], adapter_name="dora", use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        with ml.mixed_batch(ours, ["dora", "default"]):
            pass
    ml.set_adapter(ours, "default")
    ml.merge_adapters(ours)
    with pytest.raises(AdapterError, match="merged"):
        with ml.mixed_batch(ours, ["default", "other"]):
            pass


def test_merging_one_of_two_adapters_with_different_targets_equals_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """ "other" targets q_proj and up_proj, "default" the attention: merging either leaves the rest alone."""
    ref = peft_two_adapters(tiny_llama_dir)
    ref.save_pretrained(tmp_path)
    ours = minilora_model(tiny_llama_dir)
    load_adapters(ours, tmp_path)
    ids = input_ids()
    with torch.no_grad():
        ref.set_adapter("other")
        ml.set_adapter(ours, "other")
        ref.merge_adapter()
        reports = ml.merge_adapters(ours)
        assert len(reports) == 2 * 2  # q_proj and up_proj of both layers, nothing else
        assert_logits_close(logits(ours, ids), logits(ref, ids))
