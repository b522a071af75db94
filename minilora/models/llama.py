"""The Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2), in plain PyTorch.

One pre-norm transformer block, repeated ``num_hidden_layers`` times (Touvron et al. 2023, section 2.2):

    x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))          # SwiGLU (Shazeer 2020)

with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings in the "rotate half" layout (Su et al.
2021), grouped-query attention (Ainslie et al. 2023: ``num_key_value_heads`` k/v heads shared by groups of
query heads) and, for Mistral, a sliding attention window.

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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.models.config import ModelConfig

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "RotaryEmbedding",
    "StaticKVCache",
    "apply_rotary",
    "build_attention_mask",
    "generate_greedy",
    "position_ids_from_mask",
    "rope_inv_freq",
]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 and cast back (as transformers does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The rotary inverse frequencies theta^(-2i/d), i < d/2, with the config's scaling applied.

    - ``default``: theta^(-2i/d).
    - ``linear`` (Position Interpolation): every frequency divided by ``factor``.
    - ``llama3``: long wavelengths (> original_context / low_freq_factor) divided by ``factor``, short
      ones (< original_context / high_freq_factor) kept, the band between interpolated smoothly.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    s = config.rope_scaling
    if config.rope_type == "linear":
        inv_freq = inv_freq / s["factor"]
    elif config.rope_type == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_context = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids, computed in float32 and cast to the activations' dtype."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config, device), persistent=False)

    def reset_inv_freq(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.config, device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): the "rotate half" layout pairs i with i + hd/2
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hd) by the position angles: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, heads, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]


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


class StaticKVCache:
    """A KV cache whose every shape and address stays fixed while decoding: one token is one CUDA graph.

    Where :class:`KVCache` returns the keys stored so far (a length that grows, decided on the host), this
    one always returns all ``max_len`` slots and masks the unused ones; the next slot and each row's next
    position live in device tensors, advanced in place (gpt-fast's static cache). ``valid`` (B, max_len)
    marks slots holding a real token (left padding of a batched prompt stays invalid).
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
        self.batch_size, self.max_len = batch_size, max_len
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


# ---------------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, through F.scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_sliding_windows[layer_idx]
        hidden, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, hidden, bias=config.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        # Each k/v head serves n_heads // n_kv_heads query heads (GQA). SDPA's fused kernels take an explicit
        # mask only with as many k/v heads as query heads (else it falls back to the quadratic-memory math
        # kernel), so with a mask the k/v heads are repeated here.
        if mask is not None and self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers and the final norm: input ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
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
            return self._layers(self.embed_tokens(input_ids), position_ids, masks, cache)
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

        x = self.embed_tokens(input_ids)  # (B, T, C)
        # One mask per distinct window. Without padding, cache or window, SDPA's is_causal does it.
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.config.layer_sliding_windows):
            if attention_mask is None and document_ids is None and past_len == 0 and window is None:
                masks[window] = None
            else:
                masks[window] = build_attention_mask(T, past_len, attention_mask, window, x.device, document_ids)
        return self._layers(x, position_ids, masks, cache)

    def _layers(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        masks: dict[int | None, torch.Tensor | None],
        cache: KVCache | StaticKVCache | None,
    ) -> torch.Tensor:
        """The decoder layers and the final norm over embeddings x (B, T, C)."""
        T = x.shape[1]
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B|1, T, hd)
        for layer in self.layers:
            mask = masks[layer.self_attn.sliding_window]
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

    Serves every supported family (llama, mistral, qwen2); ``config`` says which. With
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

    def forward(
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
        return self.lm_head(hidden)


@torch.no_grad()
def generate_greedy(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache: returns (B, T + n) token ids, n <= max_new_tokens.

    Like transformers' ``generate(do_sample=False)``: a sequence that produced ``eos_token_id`` is padded
    with ``pad_token_id`` (default: the eos id) and decoding stops once every sequence has finished.
    """
    B, T = input_ids.shape
    device = input_ids.device
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.config, B, T + max_new_tokens, dtype=dtype, device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device) if attention_mask is None else attention_mask.long()
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = [input_ids]
    logits = model(input_ids, attention_mask=mask, cache=cache)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1)  # (B,)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            finished = finished | (next_token == eos_token_id)
        tokens.append(next_token[:, None])
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
        logits = model(next_token[:, None], attention_mask=mask, cache=cache)
    return torch.cat(tokens, dim=1)
