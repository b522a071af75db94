"""The decoder's parts: RMSNorm, the attention masks, grouped-query attention and the gated MLP.

Each part reads the family switches it needs from the config (minilora.models.families):

    RMSNorm       x_hat * w (Llama)  or  x_hat * (1 + w) in float32 (Gemma)
    Attention     q/k/v or a fused qkv_proj; optional per-head q/k norms; RoPE (minilora.models.rope);
                  SDPA, or explicit soft-capped scores (Gemma-2)
    MLP           down(act(gate) * up), act = silu (SwiGLU) or tanh GELU (GeGLU); or a fused gate_up_proj

Names are transformers' (``self_attn.q_proj``, ``mlp.gate_up_proj`` ...), so checkpoints load by identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.config import ModelConfig
from minilora.models.rope import apply_rotary

__all__ = [
    "MLP",
    "Attention",
    "KVCache",
    "RMSNorm",
    "StaticKVCache",
    "build_attention_mask",
    "make_norm",
    "position_ids_from_mask",
    "softcap",
    "softcapped_attention",
]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32.

    Llama casts the normalised x back before the product (``weight * x_hat.to(dtype)``); Gemma
    (``unit_offset=True``, weights stored as offsets from 1) multiplies in float32 and casts after:
    ``(x_hat * (1 + weight)).to(dtype)``, as transformers does for each.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset" if self.unit_offset else "")


def make_norm(config: ModelConfig, size: int) -> RMSNorm:
    """The family's RMSNorm over ``size`` features."""
    return RMSNorm(size, config.rms_norm_eps, unit_offset=config.norm_unit_offset)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma-2's soft cap: cap * tanh(x / cap), smooth and bounded by +-cap."""
    return torch.tanh(x / cap) * cap


# ---------------------------------------------------------------------------------------------- masks
def position_ids_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions that skip padding: the number of real tokens before each one (0 at padding).

    ``attention_mask`` (B, S) with 1 for tokens, 0 for padding (left or right); returns the last ``length``
    columns, (B, length). This is what transformers' ``generate`` uses for left-padded batches.
    """
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1  # (B, S)
    pos = pos.masked_fill(mask == 0, 0)
    return pos[:, -length:]


def build_attention_mask(
    q_len: int,
    past_len: int,
    attention_mask: torch.Tensor | None,
    sliding_window: int | None,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, q_len, past_len + q_len) for SDPA: True where a query may attend.

    Query i (absolute index past_len + i) sees key j when j <= i (causal), j is not padding, i - j <
    sliding_window when a window is set, and j belongs to the same example as i when ``document_ids``
    (B, q_len) says which example each position of a packed row holds (no cache then): packed examples
    never see each other, a block-diagonal causal mask. A query that would see nothing (a left-padding
    position) is allowed to see every key instead: its output is garbage either way, but it stays finite,
    so no NaN reaches the real tokens through later layers.
    """
    kv_len = past_len + q_len
    q_idx = torch.arange(past_len, kv_len, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    allowed = allowed[None]  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()  # (B, T, S)
    if document_ids is not None:
        assert past_len == 0, "document_ids describe packed rows, which are never decoded with a cache"
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])  # (B, T, T)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]  # (B, 1, T, S)


# ---------------------------------------------------------------------------------------------- blocks
def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
) -> torch.Tensor:
    """Attention with Gemma-2's capped scores: softmax(cap * tanh(q.k * scale / cap) masked) v.

    The cap sits between the product and the softmax, so SDPA cannot run it; this is the explicit
    form (softmax in float32). q (B, nh, T, hd), k/v (B, nkv, S, hd), mask (B|1, 1, T, S) True = attend.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    v = v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    scores = softcap(q @ k.transpose(-2, -1) * scale, cap)  # (B, nh, T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, nh, T, hd)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, through F.scaled_dot_product_attention.

    Family pieces: one fused ``qkv_proj`` (Phi-3) instead of q/k/v; ``q_norm``/``k_norm`` over each head
    (Qwen3, Gemma-3); Gemma's query scale and Gemma-2's score soft-cap (then :func:`softcapped_attention`).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_sliding_windows[layer_idx]
        self.local_rope = config.layer_local_rope[layer_idx]
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        hidden, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.fused_qkv = config.fused_qkv
        if self.fused_qkv:
            self.qkv_proj = nn.Linear(hidden, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=bias)
        else:
            self.q_proj = nn.Linear(hidden, self.n_heads * hd, bias=bias)
            self.k_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
            self.v_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, hd)
            self.k_norm = make_norm(config, hd)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, nh*hd), k and v (B, T, nkv*hd)."""
        if self.fused_qkv:
            q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)  # rows [q | k | v]
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh|nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        if self.softcap is not None:
            if mask is None:
                mask = build_attention_mask(T, 0, None, None, x.device)
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:
            # Each k/v head serves n_heads // n_kv_heads query heads (GQA). SDPA's fused kernels take an
            # explicit mask only with as many k/v heads as query heads (else it falls back to the
            # quadratic-memory math kernel), so with a mask the k/v heads are repeated here.
            if mask is not None and self.n_kv_heads != self.n_heads:
                k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, S, hd)
                v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, S, hd)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (tanh GELU, Gemma).

    Phi-3 stores gate and up as one ``gate_up_proj`` (rows [gate | up]).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.fused_gate_up = config.fused_gate_up
        if self.fused_gate_up:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, inter, bias=bias)
            self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, inter) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


# ---------------------------------------------------------------------------------------------- cache
class KVCache:
    """Pre-allocated keys and values for every layer, written in place during generation.

    ``keys[i]`` / ``values[i]``: (batch_size, num_key_value_heads, max_len, head_dim); ``length`` counts
    the positions already stored. The model calls :meth:`update` once per layer and :meth:`advance` once
    per forward; callers only create the cache, read ``length`` and may :meth:`reset` it.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, max_len={self.max_len}")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]  # (B, n_kv, S, hd)

    def advance(self, n: int) -> None:
        """Mark n more positions as stored (called by the model after all layers ran)."""
        self.length += n

    def reset(self) -> None:
        """Forget every stored position (the buffers are reused)."""
        self.length = 0


class StaticKVCache(KVCache):
    """A KV cache whose every shape and address stays fixed while decoding: one token is one CUDA graph.

    Where :class:`KVCache` returns the keys stored so far (a length that grows, decided on the host), this
    one always returns all ``max_len`` slots and masks the unused ones; the next slot and each row's next
    position live in device tensors, advanced in place (gpt-fast's static cache). ``valid`` (B, max_len)
    marks slots holding a real token (left padding of a batched prompt stays invalid).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # KVCache's arguments
        super().__init__(*args, **kwargs)
        batch_size, max_len, device = self.batch_size, self.max_len, self.keys[0].device
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # next slot, shared by the rows
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's next position
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self._slots = torch.arange(max_len, device=device)

    def begin(
        self, T: int, attention_mask: torch.Tensor | None, windows: set[int | None]
    ) -> tuple[torch.Tensor, dict[int | None, torch.Tensor]]:
        """Positions (B, T) and one mask (B, 1, T, max_len) per window for T new tokens; marks their slots."""
        new = self.slot + self._slots[:T]  # (T,) slots written by this forward
        real = torch.ones(self.batch_size, T, dtype=torch.long, device=new.device)
        if attention_mask is not None:  # a left-padded prompt: (B, T) 1 = token
            real = attention_mask[:, -T:].long()
        position_ids = self.next_pos[:, None] + real.cumsum(-1) - 1  # (B, T)
        self.valid[:, new] = real.bool()
        causal = self._slots[None, :] <= new[:, None]  # (T, S)
        masks = {}
        for window in windows:
            allowed = causal if window is None else causal & (self._slots[None, :] > new[:, None] - window)
            allowed = allowed[None] & self.valid[:, None, :]  # (B, T, S)
            masks[window] = (allowed | ~allowed.any(dim=-1, keepdim=True))[:, None]  # (B, 1, T, S)
        self.next_pos += real.sum(-1)
        self._new = new
        return position_ids.clamp(min=0), masks

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) into this forward's slots; return every slot (B, n_kv, max_len, hd)."""
        self.keys[layer_idx].index_copy_(2, self._new, k)
        self.values[layer_idx].index_copy_(2, self._new, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.slot += n  # in place: a captured graph replays it

    def reset(self) -> None:
        self.slot.zero_()
        self.next_pos.zero_()
        self.valid.zero_()
