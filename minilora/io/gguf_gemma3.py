"""GGUF import for Gemma-3 text models (``general.architecture = "gemma3"``), e.g. Gemma-3 270M.

What llama.cpp's converter did to a transformers Gemma-3, undone here:
- every RMSNorm weight (the four per layer, the q/k norms, the final norm) was stored as ``1 + w``,
  because ggml's norm multiplies by the weight itself; transformers' Gemma norm computes x_hat * (1 + w),
  so ``w = stored - 1``;
- q/k rows were NOT permuted (Gemma uses the NeoX / "rotate half" RoPE in ggml too), so, unlike Llama,
  they load as stored;
- the metadata carries the global RoPE base, the window and the head size; the local RoPE base (10000),
  the window pattern (5 sliding layers, then a global one) and ``query_pre_attn_scalar`` (= head_dim for
  the released sizes below 27B) are fixed by the architecture, and are what transformers assumes too.

Tensor names: blk.N.{attn_norm, post_attention_norm, ffn_norm, post_ffw_norm} are the input,
post-attention, pre-feed-forward and post-feed-forward norms; attn_{q,k}_norm the per-head q/k norms.
"""

from __future__ import annotations

from typing import Any

import torch

from minilora.errors import CheckpointError
from minilora.io.gguf_format import (
    BLOCK_RE,
    PROJECTION_NAMES,
    GGUFFile,
    check_complete,
    f32_decimal,
    meta_value,
    rope_scaling_of,
    special_token_ids,
)

__all__ = ["GEMMA3_BLOCK_NAMES", "gemma3_config", "gemma3_state_dict"]

GEMMA3_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    **PROJECTION_NAMES,
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
SLIDING_WINDOW_PATTERN = 6


def gemma3_config(gf: GGUFFile) -> dict[str, Any]:
    """A transformers Gemma3TextConfig dict from the ``gemma3.*`` metadata and the tensor shapes."""
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path}: missing tensor 'token_embd.weight'")
    n_layers = int(meta_value(gf, "gemma3.block_count"))
    hidden = int(meta_value(gf, "gemma3.embedding_length"))
    n_heads = int(meta_value(gf, "gemma3.attention.head_count"))
    head_dim = int(meta_value(gf, "gemma3.attention.key_length", hidden // n_heads))

    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(meta_value(gf, "gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta_value(gf, "gemma3.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": f32_decimal(meta_value(gf, "gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": f32_decimal(meta_value(gf, "gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10000.0,
        "rope_scaling": rope_scaling_of(gf, "gemma3"),
        "sliding_window": int(meta_value(gf, "gemma3.attention.sliding_window")),
        "layer_types": [
            "sliding_attention" if (i + 1) % SLIDING_WINDOW_PATTERN else "full_attention" for i in range(n_layers)
        ],
        "final_logit_softcapping": gf.metadata.get("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": None,
        "max_position_embeddings": int(meta_value(gf, "gemma3.context_length", 32768)),
        "vocab_size": gf.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "attention_bias": False,
        **special_token_ids(gf),
    }


def gemma3_hf_name(name: str, path: object) -> str:
    """llama.cpp Gemma-3 tensor name -> transformers name (unknown names are a ValueError)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name == "output.weight":
        return "lm_head.weight"
    m = BLOCK_RE.fullmatch(name)
    if m and m.group(2) in GEMMA3_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{GEMMA3_BLOCK_NAMES[m.group(2)]}.weight"
    raise CheckpointError(f"{path}: tensor {name!r} has no transformers Gemma-3 equivalent")


def gemma3_state_dict(gf: GGUFFile, config: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors dequantized and renamed; norm weights shifted back by -1; cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    for name in gf.tensors:
        key = gemma3_hf_name(name, gf.path)
        w = gf.tensor(name)
        if key.endswith("norm.weight"):
            w = w - 1.0  # stored as 1 + w (see the module docstring)
        state[key] = w.to(dtype).contiguous()
    check_complete(gf, state, config["num_hidden_layers"], GEMMA3_BLOCK_NAMES.values())
    return state
