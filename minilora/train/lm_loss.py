"""The loss the loop minimises: causal-LM cross-entropy on the completion tokens, and its mean for evaluation.

A step's loss is the mean over every completion token of the step, the same number transformers'
causal-LM loss gives for one batch (labels shifted by one, -100 ignored), whatever the accumulation.
Only the positions that carry a label go through the output head: with a 49k vocabulary that head
costs more than the rest of a small model, and prompt positions contribute nothing to the loss anyway.
The CUDA-graph step (minilora.train.cuda_graph) takes fixed shapes instead: ``pad_micro_batches`` stacks
the micro-batches, ``accumulated_causal_lm_loss`` runs every position through the chunked cross-entropy
(minilora.kernels.loss) and lets the -100 labels do the selection. The loop itself is minilora.train.loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.llama import position_ids_from_mask
from minilora.train.config import TrainConfig, autocast_for
from minilora.train.data import IGNORE_INDEX, Batch, Example, eval_batches
from minilora.train.fast import document_ids

CHUNKED_LOGITS = 2**28  # above this many logits (1 GiB in float32) the loss goes chunk by chunk


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies over target tokens, their count), labels shifted by one, -100 ignored.

    Only the hidden states at target positions go through the output head (see the module docstring).
    """
    labels = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE_INDEX  # (B, T-1)
    n = int(keep.sum())
    mask = batch.attention_mask
    if batch.position_ids is None and bool(mask.all()):
        mask = None  # no padding: let attention take its causal fast path
    kw = {} if batch.position_ids is None else {"document_ids": document_ids(batch.position_ids)}  # packed rows
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, **kw)  # (B, T, C)
        head = model.lm_head
        capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None
        plain = type(head) is nn.Linear and head.bias is None and not capped
        if plain and n * head.out_features > CHUNKED_LOGITS:
            # long sequences: never all N x V float32 logits at once (1 GB per 2,048 tokens of a Llama-3 head)
            from minilora.kernels.loss import chunked_cross_entropy

            loss_sum = chunked_cross_entropy(hidden[:, :-1][keep], head.weight, labels[keep], 1024, reduction="sum")
            return loss_sum, n
        rows = hidden[:, :-1][keep]  # (N, C)
        logits = model.head(rows) if hasattr(model, "head") else head(rows)  # (N, V); head: + soft-cap
    else:
        logits = model(batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, **kw)[:, :-1][keep]
    loss_sum = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
    return loss_sum, n


def pad_micro_batches(
    micro: Sequence[Batch], rows: int, multiple: int, pad_token_id: int = 0
) -> tuple[torch.Tensor, ...]:
    """Stack micro-batches into fixed shapes for a CUDA graph: (ids, labels, mask[, positions]), each (A, rows, T).

    T is the longest micro-batch rounded up to `multiple`; short batches get extra rows holding one unmasked
    pad token (a fully masked row would make attention divide by zero) and labels -100 everywhere, so the
    loss and its gradient are those of the real rows.
    """
    if any(b.input_ids.shape[0] > rows for b in micro):
        raise ValueError(f"a micro-batch has more than {rows} rows")
    length = max(b.input_ids.shape[1] for b in micro)
    length = -(-length // multiple) * multiple
    a, device = len(micro), micro[0].input_ids.device
    ids = torch.full((a, rows, length), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full((a, rows, length), IGNORE_INDEX, dtype=torch.long, device=device)
    mask = torch.zeros((a, rows, length), dtype=torch.long, device=device)
    mask[:, :, 0] = 1  # padding rows: one visible token
    packed = any(b.position_ids is not None for b in micro)
    positions = torch.zeros((a, rows, length), dtype=torch.long, device=device) if packed else None
    for i, b in enumerate(micro):
        n, t = b.input_ids.shape
        ids[i, :n, :t], labels[i, :n, :t], mask[i, :n, :t] = b.input_ids, b.labels, b.attention_mask
        mask[i, :n, t:] = 0
        if positions is not None:
            pos = b.position_ids if b.position_ids is not None else position_ids_from_mask(b.attention_mask, t)
            positions[i, :n, :t] = pos
    return (ids, labels, mask) if positions is None else (ids, labels, mask, positions)


def accumulated_causal_lm_loss(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    autocast: Any = None,
) -> torch.Tensor:
    """The loop's step on stacked micro-batches (A, B, T), with no host synchronisation (CUDA-graph safe).

    For each micro-batch: the summed cross-entropy of its target tokens over N (all target tokens of the
    step, counted on the device), then backward, as in the eager loop. Every position goes through the
    output head, chunk by chunk (kernels.loss.chunked_cross_entropy); -100 labels drop out. Returns the
    step's mean loss, detached.
    """
    from minilora.kernels.loss import chunked_cross_entropy

    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise ValueError("the CUDA-graph step needs a causal LM with .model and .lm_head (minilora's Llama)")
    count = (labels[:, :, 1:] != IGNORE_INDEX).sum().clamp(min=1)  # N, on the device
    total = torch.zeros((), dtype=torch.float32, device=ids.device)
    for i in range(ids.shape[0]):
        with autocast if autocast is not None else nullcontext():
            pos = None if positions is None else positions[i]
            doc = None if pos is None else document_ids(pos)  # packed rows: attention within each example
            hidden = model.model(ids[i], attention_mask=mask[i], position_ids=pos, document_ids=doc)[:, :-1]
            target = labels[i][:, 1:]  # (B, T-1)
            capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None
            if type(model.lm_head) is nn.Linear and not capped:  # a plain head: never all the logits at once
                loss_sum = chunked_cross_entropy(hidden, model.lm_head.weight, target, chunk_rows=256, reduction="sum")
            else:  # an adapted or soft-capped head: through the module
                head = model.head if hasattr(model, "head") else model.lm_head
                logits = head(hidden).float()  # (B, T-1, V)
                loss_sum = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        (loss_sum / count).backward()
        total = total + loss_sum.detach()
    return total / count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int = 16,
    pad_token_id: int = 0,
    config: TrainConfig | None = None,
    loss_of: Callable[[Batch], tuple[torch.Tensor, int]] | None = None,
) -> float:
    """Mean cross-entropy over every completion token of ``examples`` (model left in its previous mode).

    loss_of: what computes a batch's (loss sum, count); default causal_lm_loss on ``model`` (a distributed run
    passes its wrapped model's, minilora.train.distributed).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in eval_batches(examples, batch_size, pad_token_id):
            with autocast_for(config or TrainConfig(), device):
                loss_sum, n = loss_of(batch.to(device)) if loss_of else causal_lm_loss(model, batch.to(device))
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation examples hold no completion tokens")
    return total / count
