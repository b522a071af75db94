"""The minilora decoder against transformers: logits and greedy generation, from transformers checkpoints.

Each case builds a tiny random Llama / Mistral / Qwen2 with transformers, saves it with
``save_pretrained`` (single file, or sharded with ``max_shard_size``), loads it with
``minilora.loading.from_pretrained`` and compares float32 logits (max abs diff <= 1e-4), with and
without a left-padded batch, and greedy tokens against ``generate(do_sample=False)``.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minilora.generate import generate_greedy  # noqa: E402
from minilora.loading import from_pretrained  # noqa: E402
from minilora.models.llama import KVCache, LlamaForCausalLM  # noqa: E402

VOCAB = 256
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama": ("llama", {}),
    "llama-llama3-rope-tied": ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama-linear-rope": (
        "llama",
        {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    ),
    "llama-headdim-bias": ("llama", {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides: object) -> "transformers.PreTrainedModel":
    """A random transformers model of the given family (hidden 64, 2 layers, GQA 4/2 heads)."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # larger than the default init so that every part of the model matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def left_padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    hf = tiny_hf_model(family, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    sharded = request.param in ("llama-llama3-rope-tied", "mistral-window")
    hf.save_pretrained(path, max_shard_size="40KB" if sharded else "1GB")
    if sharded:
        assert (path / "model.safetensors.index.json").exists()
    return hf, from_pretrained(path), path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 13, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_logits_match_with_left_padding(pair):
    hf, ours, _ = pair
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_right_padding_matches_unpadded_prefix(pair):
    _, ours, _ = pair
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(padded, attention_mask=mask)[:, :9], ours(ids), atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    ids, mask = left_padded_batch(seed=5)
    expected = hf.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    got = generate_greedy(ours, ids, 10, attention_mask=mask)
    assert torch.equal(got, expected)


def test_kv_cache_steps_equal_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    cache = KVCache(ours.config, batch_size=2, max_len=12)
    with torch.no_grad():
        full = ours(ids)
        parts = [ours(ids[:, :5], cache=cache)]
        for t in range(5, 12):
            parts.append(ours(ids[:, t : t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_module_names_and_tied_head(pair):
    hf, ours, _ = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()


def test_sliding_window_changes_the_output(tmp_path):
    """The Mistral window (5 < 13 tokens) is really applied: the same weights without it differ."""
    hf = tiny_hf_model("mistral", sliding_window=5)
    hf.save_pretrained(tmp_path)
    windowed = from_pretrained(tmp_path)
    full = LlamaForCausalLM(windowed.config.__class__(**{**windowed.config.__dict__, "sliding_window": None}))
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = windowed(ids), full.eval()(ids)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


def test_gradient_checkpointing_same_gradients(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = from_pretrained(tmp_path).train()
        model.gradient_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
