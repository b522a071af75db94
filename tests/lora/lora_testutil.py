"""Helpers for the LoRA tests: the tiny Llama config, loading it both ways, comparing logits."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hf_model(path: Path) -> nn.Module:
    """The tiny checkpoint as a transformers LlamaForCausalLM, float32, eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def minilora_model(path: Path, quantize: str | None = None) -> nn.Module:
    """The tiny checkpoint as minilora's own model (minilora.loading.from_pretrained), eval mode."""
    from minilora.loading import from_pretrained

    model = from_pretrained(path, quantize=quantize) if quantize else from_pretrained(path)
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """max |ours - ref| <= rel * max |ref| (the tolerance is relative to the logit scale)."""
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} * logit scale {scale:.3g}"


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every lora_A / lora_B / DoRA magnitude tensor random values (B nonzero, m away from ||W||)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen).to(param.dtype))
        elif "lora_" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=gen).to(param.dtype))


def input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
