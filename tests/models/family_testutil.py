"""Tiny random checkpoints of Qwen3, Gemma-2, Gemma-3 and Phi-3 built by transformers, every switch on.

Each case turns on what its family changes, at sizes where the change shows in 13 tokens: a sliding
window of 5, soft-caps small enough to bend scores and logits (1 and 0.5 instead of 50 and 30), a query scale and
head_dim unlike hidden/heads, a local RoPE base, partial RoPE and longrope with an original context of 8.
"""

from __future__ import annotations

import torch

from tests.lora.lora_testutil import randomize_adapters  # noqa: F401  (re-exported for the family tests)

VOCAB = 256
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,  # bitsandbytes' CPU 4-bit forward wants in_features in multiples of 64
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[str, str, dict[str, object]]] = {
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=32, use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=False),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=1.0,
            final_logit_softcapping=0.5,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=32,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            attn_logit_softcapping=1.0,  # read, but never applied by transformers' Gemma-3
            final_logit_softcapping=0.5,
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            sliding_window=6,
            partial_rotary_factor=0.5,
            original_max_position_embeddings=8,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.3, 1.7, 2.2],  # one per rotated pair: 16 * 0.5 / 2
                "long_factor": [1.1, 2.0, 3.5, 6.0],
            },
            tie_word_embeddings=False,
        ),
    ),
}


def tiny_family_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random transformers model of the family; norms and biases perturbed so that every part matters."""
    import transformers

    config_name, model_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **overrides})
    if family.startswith("gemma"):
        config._attn_implementation = "eager"  # the soft-capped scores are only exact on the eager path
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)  # scores of order 1, so that soft-caps and windows bend them
            elif "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def left_padded_batch(seed: int = 1, length: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask
