"""Gradient checkpointing whose checkpoints wait in (pinned) CPU memory: long context on one card.

With checkpointing, what the backward needs of a decoder layer is only its input x (B, T, C): 8 KB per
token per layer in bf16 at Llama-3-8B's width, 256 KB per token for 32 layers, 32 GB at 128k tokens.
Here each layer's input is copied to CPU memory in the forward and brought back for the recompute, so
the GPU holds one layer's activations at a time:

    forward:   y = layer(x) without autograd; x -> CPU (pinned, asynchronous); RNG state kept
    backward:  x <- CPU; y = layer(x) again with autograd, the same RNG (same dropout); backward(y, dy)

Set as ``model.model.checkpoint_fn`` (``TrainConfig(offload_checkpoints=True)``); the eager loop only
(a CUDA graph cannot wait on host copies in its backward).

The frozen input embedding goes the same way (``embedding_on_host``, on by default on CUDA): a step reads a
few of its rows, so its table can wait in pinned host memory and be read there by a kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, layer: nn.Module, n_rest: int, x: torch.Tensor, *more: Any) -> torch.Tensor:  # type: ignore[override]
        # more = the layer's other inputs, then its trainable parameters (inputs of this node only so that
        # its output requires grad even when x does not: their gradients accumulate in the recompute)
        rest = more[:n_rest]
        ctx.layer, ctx.rest, ctx.device, ctx.n_more = layer, rest, x.device, len(more)
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.dev_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.saved_x = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        ctx.saved_x.copy_(x.detach(), non_blocking=x.is_cuda)
        with torch.no_grad():
            return layer(x, *rest)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x = ctx.saved_x.to(ctx.device, non_blocking=True).requires_grad_(True)
        devices = [ctx.device] if ctx.dev_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.dev_rng is not None:
                torch.cuda.set_rng_state(ctx.dev_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                y = ctx.layer(x, *ctx.rest)
        torch.autograd.backward(y, grad)
        return (None, None, x.grad) + (None,) * ctx.n_more


def offloaded_checkpoint(layer: nn.Module, x: torch.Tensor, *rest: Any) -> torch.Tensor:
    """``checkpoint(layer, x, *rest)`` with x kept in CPU memory until the backward needs it."""
    params = [p for p in layer.parameters() if p.requires_grad]
    return _Offloaded.apply(layer, len(rest), x, *rest, *params)


# ---- the frozen input embedding in pinned host memory ---------------------------------------------------


class HostEmbedding(nn.Module):
    """A frozen input embedding whose table (V, C) waits in pinned host memory: each forward reads only the
    rows of its ids (kernels.embedding_rows: on CUDA a kernel loads them over PCIe, inside a CUDA graph too).
    The table is a plain attribute, not a parameter: the model's parameters all stay on its device."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from minilora.kernels import embedding_rows

        return embedding_rows(self.table, input_ids)  # (..., C)


def host_embedding_refusal(model: nn.Module) -> str | None:
    """Why the input embedding must stay on the card (None: it can wait in host memory while training)."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if type(emb) is not nn.Embedding:
        return f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding"
    if emb.weight.requires_grad:
        return "the input embedding is trained"
    if getattr(getattr(model, "lm_head", None), "weight", None) is emb.weight:
        return "the input embedding is tied to lm_head, which reads all of it every step"
    return None


@contextmanager
def embedding_on_host(model: nn.Module) -> Iterator[None]:
    """While inside: model.model.embed_tokens is a HostEmbedding over a pinned host copy of its table and the
    card's copy is freed (Llama-3.1-8B: 1.05 GB). On exit the nn.Embedding returns with its table on the card."""
    parent, emb = model.model, model.model.embed_tokens
    device = emb.weight.device
    table = torch.empty(emb.weight.shape, dtype=emb.weight.dtype, pin_memory=emb.weight.is_cuda)
    table.copy_(emb.weight.detach())
    emb.weight.data = table  # the only reference to the card's copy goes: its memory is free
    parent.embed_tokens = HostEmbedding(table)
    try:
        yield
    finally:
        emb.weight.data = table.to(device)
        parent.embed_tokens = emb
