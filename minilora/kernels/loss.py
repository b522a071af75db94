"""Chunked cross-entropy over a large vocabulary: the logits of a few rows at a time, never all of them.

A Llama-3 head has 128,256 outputs: for 2048 tokens the float32 logits alone take 1 GB, and autograd
keeps them (and their softmax) for the backward. Here the rows are cut into chunks of `chunk_rows`; each
chunk's logits are computed, reduced to a summed loss and dropped, and recomputed in the backward
(torch.utils.checkpoint). The result equals `F.cross_entropy(hidden @ weight.T, labels)` up to float
summation order; peak extra memory is one chunk's float32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (rows, V), only this chunk
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_rows: int = 1024,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of `hidden (..., C) @ weight (V, C).T` against `labels (...)`, chunk by chunk.

    reduction: "mean" over the labels that are not `ignore_index` (as F.cross_entropy), or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the leading dims")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    y = labels.reshape(-1)  # (N,)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_rows):
        hs, ys = h[start : start + chunk_rows], y[start : start + chunk_rows]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            # No randomness inside: the RNG state need not be saved (its save is not allowed in a CUDA graph).
            total = total + checkpoint(
                _chunk_loss, hs, weight, ys, ignore_index, use_reentrant=False, preserve_rng_state=False
            )
        else:
            total = total + _chunk_loss(hs, weight, ys, ignore_index)
    if reduction == "sum":
        return total
    count = (y != ignore_index).sum().clamp(min=1)
    return total / count
