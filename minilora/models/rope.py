"""Rotary position embeddings (Su et al. 2021, RoFormer section 3.4) in the "rotate half" layout.

A head vector x of size hd is split in halves; dimension i turns with dimension i + hd/2 by the angle
``position * inv_freq[i]``:

    rope(x) = x * cos + rotate_half(x) * sin,      rotate_half([a, b]) = [-b, a]

What the families change, all read from the config (minilora.models.config):
- the frequencies (``rope_type``): ``default`` theta^(-2i/d); ``linear`` (Position Interpolation, Chen et
  al. 2023) all divided by ``factor``; ``llama3`` (Llama 3.1) long wavelengths divided, short ones kept;
  ``longrope`` (Phi-3, Ding et al. 2024 "LongRoPE") each frequency divided by its own rescale factor,
  ``short_factor`` while the sequence fits the original context and ``long_factor`` beyond it, and cos/sin
  multiplied by an attention factor sqrt(1 + ln(s) / ln(original context));
- how much of the head turns (``partial_rotary_factor``, Phi-3/4): only the first
  ``rotary_dim = int(head_dim * factor)`` dimensions are rotated, the rest pass through;
- a second base for local layers (``rope_local_theta``, Gemma-3): sliding-window layers use plain RoPE
  with that base, global layers the configured one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilora.errors import ConfigError
from minilora.models.config import ModelConfig

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_inv_freq"]


def rope_inv_freq(
    config: ModelConfig, device: torch.device | str | None = None, long: bool = False, local: bool = False
) -> torch.Tensor:
    """The rotary inverse frequencies theta^(-2i/d), i < d/2 (d = rotary_dim), with the config's scaling.

    ``long`` picks longrope's long-context factors; ``local`` the plain frequencies of Gemma-3's local base.
    """
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if local:
        return 1.0 / (config.rope_local_theta**exponents)
    inv_freq = 1.0 / (config.rope_theta**exponents)
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
    elif config.rope_type == "longrope":
        factors = s["long_factor"] if long else s["short_factor"]
        if len(factors) != dim // 2:
            raise ConfigError(
                f"longrope {'long' if long else 'short'}_factor has {len(factors)} values, need {dim // 2}"
            )
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ext * config.rope_theta**exponents)
    return inv_freq


def longrope_attention_factor(config: ModelConfig) -> float:
    """LongRoPE's cos/sin multiplier: given, or sqrt(1 + ln(s) / ln(original context)) for s > 1."""
    s = config.rope_scaling
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids, computed in float32 and cast to the activations' dtype.

    ``local=True`` builds Gemma-3's local-layer table (plain RoPE, base ``rope_local_theta``).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, local: bool = False) -> None:
        super().__init__()
        self.config = config
        self.local = local
        self.longrope = config.rope_type == "longrope" and not local
        self.attention_factor = longrope_attention_factor(config) if self.longrope else 1.0
        self.register_buffer("inv_freq", rope_inv_freq(config, device, local=local), persistent=False)
        if self.longrope:
            self.register_buffer("long_inv_freq", rope_inv_freq(config, device, long=True), persistent=False)

    def reset_inv_freq(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.config, device, local=self.local)
        if self.longrope:
            self.long_inv_freq = rope_inv_freq(self.config, device, long=True)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.longrope:
            # Long factors once any position lies beyond the original context (a tensor choice, no .item()).
            original = self.config.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(position_ids.max() + 1 > original, self.long_inv_freq, self.inv_freq)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd): the "rotate half" layout pairs i with i + rd/2
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hd) by the position angles: x*cos + rotate_half(x)*sin.

    With partial rotary (cos narrower than hd) only the first ``cos.shape[-1]`` dimensions turn.
    """
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)  # (B, heads, T, hd)
    half = rd // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, heads, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]
