"""Gradient checkpointing whose checkpoints wait in (pinned) CPU memory: long context on one card.

With checkpointing, what the backward needs of a decoder layer is only its input x (B, T, C): 8 KB per
token per layer in bf16 at Llama-3-8B's width, 256 KB per token for 32 layers, 32 GB at 128k tokens.
Here each layer's input is copied to CPU memory in the forward and brought back for the recompute, so
the GPU holds one layer's activations at a time:

    forward:   y = layer(x) without autograd; x -> CPU (pinned, asynchronous); RNG state kept
    backward:  x <- CPU; y = layer(x) again with autograd, the same RNG (same dropout); backward(y, dy)

Set as ``model.model.checkpoint_fn`` (``TrainConfig(offload_checkpoints=True)``); the eager loop only
(a CUDA graph cannot wait on host copies in its backward).
"""

from __future__ import annotations

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
