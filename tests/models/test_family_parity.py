"""Qwen3, Gemma-2, Gemma-3 and Phi-3 against transformers, from tiny random transformers checkpoints.

Per family (tests/models/family_testutil.py turns every switch on): float32 logits within 1e-4, also
left-padded; 32 greedy tokens equal to ``generate(do_sample=False)``; KV-cache steps equal to the full
forward; NF4 on load equal to transformers + bitsandbytes; a peft adapter loads into minilora and a
minilora adapter into peft, with equal logits. And each switch is shown to matter.
"""

import dataclasses

import pytest
import torch

from tests.models.family_testutil import (
    FAMILIES,
    VOCAB,
    hf_positions,
    left_padded_batch,
    randomize_adapters,
    tiny_family_model,
)

transformers = pytest.importorskip("transformers")

import minilora.lora as ml  # noqa: E402
from minilora.generate import generate_greedy  # noqa: E402
from minilora.loading import QUANTIZABLE, from_pretrained, save_quantized  # noqa: E402
from minilora.models.llama import KVCache, LlamaForCausalLM  # noqa: E402

IDS = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = tiny_family_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, from_pretrained(path), path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    with torch.no_grad():
        for length in (6, 13):  # Phi-3: short longrope factors up to 8 positions, long factors beyond
            torch.testing.assert_close(ours(IDS[:, :length]), hf(IDS[:, :length]).logits, atol=1e-4, rtol=0)


def test_logits_match_with_left_padding(pair):
    hf, ours, _ = pair
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_32_greedy_tokens_match_transformers(pair):
    hf, ours, _ = pair
    ids, mask = left_padded_batch(seed=5, length=7)
    expected = hf.generate(
        ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(generate_greedy(ours, ids, 32, attention_mask=mask), expected)


def test_kv_cache_steps_equal_full_forward(pair):
    _, ours, _ = pair
    ids = IDS[:, :8]  # within Phi-3's original context: longrope picks its factors per call, as transformers
    cache = KVCache(ours.config, batch_size=2, max_len=8)
    with torch.no_grad():
        full = ours(ids)
        parts = [ours(ids[:, :3], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_module_names_equal_transformers(pair):
    hf, ours, _ = pair
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"model.embed_tokens.embed_scale"}


SWITCHES = {
    "qwen3": [("qk_norm", False), ("sliding_window", None)],
    "gemma2": [
        ("attn_logit_softcapping", None),
        ("final_logit_softcapping", None),
        ("query_pre_attn_scalar", None),
        ("sliding_window", None),
        ("scale_embeddings", False),
    ],
    "gemma3": [("rope_local_theta", None), ("sliding_window", None), ("final_logit_softcapping", None)],
    "phi3": [("partial_rotary_factor", 1.0), ("sliding_window", None)],
}


def test_every_switch_changes_the_logits(pair):
    """Turning one family switch off (same weights) moves the logits: the parity above exercised it."""
    _, ours, _ = pair
    family = {"gemma3_text": "gemma3"}.get(ours.config.model_type, ours.config.model_type)
    with torch.no_grad():
        base = ours(IDS)
        for field, off in SWITCHES[family]:
            changes = {field: off}
            if field == "partial_rotary_factor":  # longrope factors are per rotated pair
                changes["rope_type"], changes["rope_scaling"] = "default", {}
            other = LlamaForCausalLM(dataclasses.replace(ours.config, **changes))
            other.load_state_dict(ours.state_dict(), strict=False)
            assert (other.eval()(IDS) - base).abs().max() > 1e-3, field


def test_phi3_long_factors_apply_past_the_original_context(tmp_path):
    tiny_family_model("phi3").save_pretrained(tmp_path)
    rope = from_pretrained(tmp_path).model.rotary_emb
    cos_short = rope(torch.arange(8)[None], torch.float32)[0][0]  # (8, rd)
    cos_long = rope(torch.arange(9)[None], torch.float32)[0][0]  # (9, rd): 9 positions > the original 8
    assert cos_short.shape[-1] == 8  # partial RoPE: half of head_dim 16
    assert (cos_short - cos_long[:8]).abs().max() > 1e-2
    assert rope.attention_factor > 1.0


# ---------------------------------------------------------------------------------------------- NF4
def test_nf4_on_load_matches_transformers_bitsandbytes(pair, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    _, _, path = pair
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for module in hf4.modules():  # bitsandbytes' float32 dequantize + matmul path (formats.md section 7)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ours4 = from_pretrained(path, quantize="nf4")
    quantized = [n for n, m in ours4.named_modules() if n.rsplit(".", 1)[-1] in QUANTIZABLE]
    assert quantized and all(type(ours4.get_submodule(n)).__name__ == "Linear4bit" for n in quantized)
    with torch.no_grad():
        expected = hf4(IDS).logits
        torch.testing.assert_close(ours4(IDS), expected, atol=1e-4, rtol=0)
    # ... and the checkpoint minilora writes from it loads back in transformers with the same logits.
    save_quantized(ours4, tmp_path / "nf4")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "nf4", device_map="cpu", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for module in again.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- peft
def test_peft_adapters_load_both_ways(pair, tmp_path):
    """all-linear: for Phi-3 that is qkv_proj, o_proj, gate_up_proj, down_proj (the fused modules)."""
    peft = pytest.importorskip("peft")
    hf, ours, path = pair
    peft_model = peft.get_peft_model(
        tiny_family_model_from(path),
        peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
    )
    randomize_adapters(peft_model, seed=3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = ml.load_adapter(from_pretrained(path), tmp_path / "peft")
    names = {n for n, _ in ml.lora_layers(loaded)}
    if ours.config.fused_qkv:
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= names
    with torch.no_grad():
        expected = peft_model(IDS).logits
        torch.testing.assert_close(loaded(IDS), expected, atol=1e-4, rtol=0)

    mine = ml.add_lora(from_pretrained(path), r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(mine, seed=5)
    ml.save_adapter(mine, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_family_model_from(path), tmp_path / "ours").eval()
    with torch.no_grad():
        got = mine.eval()(IDS)
        assert (got - expected).abs().max() > 1e-3  # a different adapter: the comparison is not trivial
        torch.testing.assert_close(theirs(IDS).logits, got, atol=1e-4, rtol=0)


def tiny_family_model_from(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


# ---------------------------------------------------------------------------------------------- head users
def test_loss_and_generation_paths_keep_the_final_soft_cap(tmp_path):
    """The training loss and minilora.generate run model.model and the head themselves: the cap stays on."""
    from minilora.generate import SamplingConfig, generate
    from minilora.train.data import Batch
    from minilora.train.loop import accumulated_causal_lm_loss, causal_lm_loss

    hf = tiny_family_model("gemma2")
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    labels = IDS.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = hf(IDS).logits[:, :-1]  # soft-capped by transformers
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        loss_sum, n = causal_lm_loss(ours, Batch(IDS, labels, torch.ones_like(IDS)))
    torch.testing.assert_close(loss_sum, expected, atol=1e-4, rtol=1e-6)
    step = accumulated_causal_lm_loss(ours, IDS[None], labels[None], torch.ones_like(IDS)[None])
    torch.testing.assert_close(step.detach(), expected / n, atol=1e-5, rtol=1e-6)
    want = hf.generate(IDS[:1], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 13:]
    assert generate(ours, IDS[0], SamplingConfig(max_new_tokens=32)) == want.tolist()
