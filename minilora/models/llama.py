"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2/3, Gemma-2/3, Phi-3), in plain PyTorch.

One pre-norm transformer block, repeated ``num_hidden_layers`` times (Touvron et al. 2023, section 2.2):

    x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))          # SwiGLU (Shazeer 2020)

with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings in the "rotate half" layout (Su et al.
2021), grouped-query attention (Ainslie et al. 2023: ``num_key_value_heads`` k/v heads shared by groups of
query heads) and, for Mistral, a sliding attention window. What the other families change (fused
projections, q/k norms, Gemma's norms, soft-caps and GeGLU, partial RoPE) are switches on the config,
read by minilora.models.families; RoPE itself lives in minilora.models.rope.

Module names are exactly transformers' (``model.layers.0.self_attn.q_proj`` ...), so a transformers
checkpoint loads with an identity key map. Every projection is a plain ``nn.Linear`` called as a module,
so quantization (minilora.quant) and LoRA (minilora.lora) can swap them out afterwards; nothing here reads
a projection's ``.weight``.

Generation uses :class:`KVCache`: a pre-allocated buffer of keys and values per layer, filled in place.

    cache = KVCache(model.config, batch_size=B, max_len=T + n_new, dtype=torch.float32, device="cpu")
    logits = model(prompt, attention_mask=mask, cache=cache)        # prefill: cache.length == T after
    logits = model(next_token, attention_mask=mask_with_one_more_column, cache=cache)   # one step

When a cache is used, ``attention_mask`` covers every position seen so far, cached ones included:
shape (B, cache.length + T), as in transformers' ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.models.config import ModelConfig
from minilora.models.layers import (
    MLP,
    Attention,
    KVCache,
    RMSNorm,
    StaticKVCache,
    build_attention_mask,
    make_norm,
    position_ids_from_mask,
    softcap,
)
from minilora.models.rope import RotaryEmbedding, apply_rotary, rope_inv_freq

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "RotaryEmbedding",
    "StaticKVCache",
    "apply_rotary",
    "build_attention_mask",
    "position_ids_from_mask",
    "rope_inv_freq",
]


# ---------------------------------------------------------------------------------------------- blocks
class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)).

    Gemma's "sandwich" (``sandwich_norm``) also normalises each branch's output before the residual add:
    x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))). (In Llama,
    ``post_attention_layernorm`` is the norm before the MLP.)
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.sandwich_norm = config.sandwich_norm
        if self.sandwich_norm:
            self.pre_feedforward_layernorm = make_norm(config, config.hidden_size)
            self.post_feedforward_layernorm = make_norm(config, config.hidden_size)

    def forward(  # Attention.forward's inputs, passed through
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.sandwich_norm:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers and the final norm: input ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        if config.rope_local_theta is not None:
            self.rotary_emb_local = RotaryEmbedding(config, local=True)  # Gemma-3's sliding layers
        self.gradient_checkpointing = False
        # How a checkpointed layer runs: fn(layer, *inputs) -> output. None: torch.utils.checkpoint
        # (non-reentrant). minilora.train.cuda_graph puts a CUDA-graph-safe one here.
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if isinstance(cache, StaticKVCache):  # fixed shapes: the cache gives positions and masks
            position_ids, masks = cache.begin(T, attention_mask, set(self.config.layer_sliding_windows))
            return self._layers(self._embed(input_ids), position_ids, masks, cache)
        past_len = 0 if cache is None else cache.length
        if attention_mask is not None and attention_mask.shape != (B, past_len + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past_len + T)} "
                f"(batch, cached + new positions)"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)  # (B, T)
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]  # (1, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]  # (1, T)

        x = self._embed(input_ids)  # (B, T, C)
        # One mask per distinct window. Without padding, cache or window, SDPA's is_causal does it.
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.config.layer_sliding_windows):
            if attention_mask is None and document_ids is None and past_len == 0 and window is None:
                masks[window] = None
            else:
                masks[window] = build_attention_mask(T, past_len, attention_mask, window, x.device, document_ids)
        return self._layers(x, position_ids, masks, cache)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if self.config.scale_embeddings:  # Gemma: sqrt(C), rounded to the compute dtype first
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def _layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        masks: dict[int | None, torch.Tensor | None],
        cache: KVCache | StaticKVCache | None,
    ) -> torch.Tensor:
        """The decoder layers and the final norm over embeddings x (B, T, C)."""
        T = x.shape[1]
        rope = {False: self.rotary_emb(position_ids, x.dtype)}  # cos, sin: (B|1, T, rd)
        if hasattr(self, "rotary_emb_local"):
            rope[True] = self.rotary_emb_local(position_ids, x.dtype)
        for layer in self.layers:
            mask = masks[layer.self_attn.sliding_window]
            cos, sin = rope[layer.self_attn.local_rope]
            if self.gradient_checkpointing and self.training and cache is None:
                if self.checkpoint_fn is None:
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = self.checkpoint_fn(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus the output head: ``model(input_ids) -> logits (B, T, vocab_size)``.

    Serves every supported family (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3); ``config``
    says which. With
    ``tie_word_embeddings`` the head shares the embedding matrix.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head use the embedding matrix when the config ties them (call again after re-assigning)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each decoder layer in the backward pass instead of storing its activations."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = value

    def forward(  # LlamaModel.forward's inputs, passed through (transformers' names)
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, cached + T), 1 = token, 0 = padding -> logits (B, T, V).

        Without ``position_ids``, positions count the real tokens (padding skipped) when a mask is given,
        else run on from ``cache.length``. ``document_ids`` (B, T) marks the examples of packed rows:
        attention stays inside each example (see :func:`build_attention_mask`).
        """
        hidden = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, document_ids=document_ids
        )
        return self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V): lm_head, then Gemma-2's final soft-cap if configured.

        Callers that run ``model.model`` themselves (to send only some positions to the head) use this.
        """
        logits = self.lm_head(hidden)
        if self.config.final_logit_softcapping is not None:
            logits = softcap(logits, self.config.final_logit_softcapping)
        return logits

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute every RoPE table's frequencies (after building on the meta device)."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_inv_freq(device)
