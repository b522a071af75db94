"""The fine-tuning loop: AdamW on the adapter only, warmup + cosine, accumulation, clipping, checkpoints.

QLoRA (Dettmers et al. 2023, section 3) trains only the LoRA matrices; the (quantized) base is frozen.
One optimizer step here is

    for each of grad_accum micro-batches:       loss_i = sum of token cross-entropies / N_step
        loss_i.backward()                        (N_step = completion tokens in the whole step)
    clip_grad_norm_(adapter params, max_grad_norm)
    AdamW step (lr from linear warmup then cosine decay), zero grads

so the step's loss is the mean over every completion token of the step, the same number transformers'
causal-LM loss gives for one batch (labels shifted by one, -100 ignored), whatever the accumulation.
Only the positions that carry a label go through the output head: with a 49k vocabulary that head
costs more than the rest of a small model, and prompt positions contribute nothing to the loss anyway.

Schedule (per optimizer step s, 0-based; ``total`` = max_steps):

    s <  warmup:  lr = base * (s + 1) / warmup
    s >= warmup:  lr = base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup))))

Determinism and resume: the seed fixes the adapter init (set by the caller before ``add_lora``), the
data order (epoch e is shuffled with seed (seed, e)) and dropout. A checkpoint stores adapter, optimizer,
scheduler, every RNG and the data position (minilora.train.checkpoint); ``resume=True`` restores them all,
so a run killed and resumed ends with the same adapter bytes and the same loss curve as one never stopped.
``metrics.jsonl`` is cut back to the checkpoint's step on resume, so the curve holds each step once.
A resume continues only the run that wrote the checkpoint (same configuration and data, see
minilora.train.run); the final step is always checkpointed.

Which path runs (minilora.train.fast): on CUDA, by default, compiled decoder blocks, the whole step as
one CUDA graph and packed rows; elsewhere, or with ``fast=False``, this eager loop. One log line says
which, and why a faster piece was refused. With the graph (minilora.train.cuda_graph) each optimizer
step, micro-batches included, is recorded once and replayed: the step is no longer bound by Python and
kernel launches. Shapes must then be fixed, so micro-batches are right-padded (to ``pack_length`` when
packing, else to a multiple of ``graph_pad_multiple`` tokens) and to ``batch_size`` rows (padding rows
hold one unmasked pad token and no labels; they add nothing to the loss), each distinct padded length is
captured once, and the loss is computed on the device over every position (the labels' -100 doing the
selection) through the chunked cross-entropy. Dropout in checkpointed layers draws from graph-safe
streams, saved in checkpoints like every other RNG. The first step (compile + capture) is timed apart:
``warmup_s`` in the metrics and the result, left out of the steady-state tokens/s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.llama import position_ids_from_mask
from minilora.train import checkpoint as ckpt_io
from minilora.train.data import IGNORE_INDEX, Batch, DataOrder, Example, eval_batches
from minilora.train.distributed import Single
from minilora.train.fast import choose_path, compile_blocks, document_ids, pack_first_fit
from minilora.train.metrics import Progress, plot_loss_curve, read_metrics, rewrite_metrics
from minilora.train.run import RunError, check_resume, run_identity, start_fresh
from minilora.train.weight_cache import cached_dequantize

logger = logging.getLogger(__name__)

CHUNKED_LOGITS = 2**28  # above this many logits (1 GiB in float32) the loss goes chunk by chunk


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one fine-tuning run."""

    output_dir: str = "runs/finetune"
    max_steps: int = 100  # optimizer steps; 0 means "epochs passes over the data"
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    offload_checkpoints: bool = False  # with checkpointing, keep each layer's input in CPU memory (eager loop)
    fast: bool = True  # the fastest exact path for the device (minilora.train.fast); False: the eager loop
    compile_blocks: bool | None = None  # torch.compile each decoder layer; None: as `fast` decides
    cuda_graph: bool | None = None  # capture each optimizer step as a CUDA graph (CUDA only); None: auto
    packing: bool | None = None  # pack examples into rows of pack_length tokens; None: auto
    pack_length: int | None = None  # None: the longest example rounded up to 64 tokens
    graph_pad_multiple: int = 64  # graph without packing: pad lengths to a multiple of this
    bf16: str = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU; "yes" / "no" to force
    cache_base_weights: bool = False  # dequantize the frozen base once (faster, float-size memory)
    eval_every: int = 0  # steps; 0: only at the end (if there is eval data)
    eval_batch_size: int = 16
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    keep_last: int = 2
    log_every: int = 1  # steps between metrics.jsonl records
    print_every: int = 10  # steps between log lines when there is no progress bar
    seed: int = 0
    progress: bool = True
    plot: bool = True
    save_final_adapter: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_last", "log_every", "print_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.graph_pad_multiple < 1:
            raise ValueError(f"TrainConfig.graph_pad_multiple must be >= 1, got {self.graph_pad_multiple}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.bf16 not in ("auto", "yes", "no"):
            raise ValueError(f"TrainConfig.bf16 must be 'auto', 'yes' or 'no', got {self.bf16!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainResult:
    """What a run produced."""

    steps: int
    final_loss: float
    eval_loss: float | None
    output_dir: Path
    adapter_dir: Path | None
    metrics_path: Path
    plot_path: Path | None
    wall_s: float
    tokens: int
    resumed_from: int | None = None
    losses: list[float] = field(default_factory=list)
    path: str = "eager (reference)"  # which training path ran (minilora.train.fast)
    warmup_s: float | None = None  # the first step's time when it compiled and captured
    changes: list[str] = field(default_factory=list)  # what --allow-changes let differ from the checkpoint


# ---------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Seed Python's random, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (requires_grad), in model order; refuses a model with none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add an adapter first (minilora.lora.add_lora)")
    return params


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


def _match_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """After loading a checkpoint saved in the other mode (eager <-> CUDA graph): the groups' `capturable`
    flag, the learning rate (a plain number when not capturable) and the step counts (on the parameters'
    device when capturable) as this run needs them."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        if not capturable and torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].to(p.device if capturable else "cpu", torch.float32)


def _autocast(config: TrainConfig, device: torch.device, cache_enabled: bool = True) -> Any:
    use = config.bf16 == "yes" or (config.bf16 == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled) if use else nullcontext()


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
            with _autocast(config or TrainConfig(), device):
                loss_sum, n = loss_of(batch.to(device)) if loss_of else causal_lm_loss(model, batch.to(device))
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation examples hold no completion tokens")
    return total / count


# ---------------------------------------------------------------------------------------------- the loop
def _find_checkpoint(out: Path, resume: bool | str | os.PathLike) -> ckpt_io.CheckpointPaths | None:
    """The checkpoint to continue from: None for a fresh start; an error when resume finds none."""
    if resume is False or resume is None:
        return None
    if resume is True:
        ckpt = ckpt_io.latest_checkpoint(out)
        if ckpt is None:
            raise RunError(
                f"--resume: no complete checkpoint under {ckpt_io.checkpoint_root(out)}; nothing to continue "
                "(start without --resume, with --overwrite if the directory holds files)"
            )
        return ckpt
    path = Path(resume)
    m = ckpt_io._NAME.match(path.name)
    if not (m and (path / ckpt_io.STATE_NAME).is_file()):
        raise RunError(f"{path}: not a complete checkpoint directory (checkpoint-N with {ckpt_io.STATE_NAME})")
    return ckpt_io.CheckpointPaths(path, int(m.group(1)))


def _apply_changes(optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig, step: int) -> None:
    """After resuming with --allow-changes: this run's hyper-parameters in the optimizer, and the learning
    rate recomputed from the (new) schedule at the step reached, instead of the checkpoint's values."""
    for group in optimizer.param_groups:
        group.update(betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, initial_lr=config.lr)
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    scheduler.lr_lambdas = [scheduler.lr_lambdas[0] for _ in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@dataclass
class _Run:
    """The state one run carries from step to step: what the named steps of :func:`train` read and advance."""

    model: nn.Module
    config: TrainConfig
    out: Path
    device: torch.device
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    order: DataOrder
    total_steps: int
    identity: dict[str, Any]
    pad_token_id: int
    t_start: float
    dist: Single  # the other ranks (Single: this process alone)
    loss_of: Callable[[Batch], tuple[torch.Tensor, int]]  # causal_lm_loss on the (wrapped) model
    step: int = 0
    tokens_seen: int = 0
    graphed: Any = None  # a CUDAGraphStep when the whole step is one CUDA graph
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    warmup_s: float | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def _data(train_examples: Sequence[Example], plan: Any) -> Sequence[Example]:
    """Data: the examples as the chosen path reads them (packed into rows of ``plan.pack_length``)."""
    return pack_first_fit(train_examples, plan.pack_length) if plan.pack_length else train_examples


def _new_run(
    model: nn.Module,
    params: list[nn.Parameter],
    examples: Sequence[Example],
    config: TrainConfig,
    plan: Any,
    identity: dict[str, Any],
    pad: int,
    t_start: float,
    dist: Single,
    loss_of: Callable[[Batch], tuple[torch.Tensor, int]],
) -> _Run:
    """Optimizer, warmup + cosine schedule and data order, on a model set up for the chosen path."""
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        capturable=plan.cuda_graph,  # the step count lives on the GPU, where the graph reads it
    )
    order = DataOrder(examples, config.batch_size, seed=config.seed, pad_token_id=pad)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * order.batches_per_epoch / config.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = config.gradient_checkpointing
    if config.offload_checkpoints:
        if not (config.gradient_checkpointing and hasattr(getattr(model, "model", None), "checkpoint_fn")):
            raise ValueError("TrainConfig.offload_checkpoints needs gradient_checkpointing and a minilora decoder")
        if plan.cuda_graph:
            raise ValueError("TrainConfig.offload_checkpoints runs in the eager loop: set cuda_graph=False")
        from minilora.train.offload import offloaded_checkpoint

        model.model.checkpoint_fn = offloaded_checkpoint
    device = next(model.parameters()).device
    out = Path(config.output_dir)
    return _Run(
        model,
        config,
        out,
        device,
        params,
        optimizer,
        scheduler,
        order,
        total_steps,
        identity,
        pad,
        t_start,
        dist,
        loss_of,
    )


def _restore(run: _Run, ckpt: ckpt_io.CheckpointPaths, plan: Any, allow_changes: bool) -> tuple[dict, list[str]]:
    """Checkpoint (read): every state of ``ckpt`` into the run, refusing a checkpoint of another run."""
    state = ckpt_io.load_checkpoint_state(ckpt)
    _, changes = check_resume(run.out, state["trainer_state"].get("run"), run.identity, allow_changes, ckpt.step)
    run.dist.restore(run.model, run.optimizer, ckpt.adapter, state["optimizer"])  # alone: files + load_state_dict
    _match_capturable(run.optimizer, plan.cuda_graph)
    run.scheduler.load_state_dict(state["scheduler"])
    if changes:
        _apply_changes(run.optimizer, run.scheduler, run.config, ckpt.step)
    ckpt_io.set_rng_state(state["rng"])
    run.order.load_state_dict(state["trainer_state"]["data"])
    run.step = ckpt.step
    run.tokens_seen = int(state["trainer_state"].get("tokens", 0))
    kept = [m for m in read_metrics(run.metrics_path) if m.get("step", 0) <= run.step]
    if changes:
        kept.append({"step": run.step, "event": "resumed with changes", "changes": changes})
    run.dist.on_main(lambda: rewrite_metrics(run.metrics_path, kept))
    logger.info("resumed from %s (step %d)", ckpt.directory, run.step)
    return state, changes


def _capture(run: _Run, rng: dict[str, Any] | None) -> None:
    """Step (CUDA path): the whole optimizer step as one graph, its dropout streams restored on resume."""
    from minilora.train.cuda_graph import CUDAGraphStep

    config, device = run.config, run.device

    def graph_loss(m: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        # autocast's weight cache would hold tensors of the capture: off inside graphs
        return accumulated_causal_lm_loss(m, *inputs, autocast=_autocast(config, device, cache_enabled=False))

    run.graphed = CUDAGraphStep(
        run.model, run.optimizer, graph_loss, max_grad_norm=config.max_grad_norm, seed=config.seed, backward=False
    )
    if rng is not None:
        run.graphed.set_rng_state(rng.get("graph", {}))


def _step(run: _Run, micro: list[Batch], n_step: int, pad_multiple: int) -> tuple[float, float | None]:
    """Step: one optimizer step over ``micro`` (``n_step`` completion tokens); returns (loss, grad norm)."""
    config, grad_norm = run.config, None
    if run.graphed is not None:  # the whole step, replayed
        inputs = pad_micro_batches(micro, config.batch_size, pad_multiple, run.pad_token_id)
        loss = float(run.graphed(*inputs))
        if run.graphed.grad_norm is not None:
            grad_norm = float(run.graphed.grad_norm)
        run.scheduler.step()
        run.graphed.adopt_lrs()
        return loss, grad_norm
    loss_total = 0.0
    for i, batch in enumerate(micro):
        with run.dist.no_sync(accumulating=i < len(micro) - 1):  # one all-reduce per step
            with _autocast(config, run.device):
                loss_sum, _ = run.loss_of(batch)
            (loss_sum / n_step).backward()
        loss_total += float(loss_sum.detach())
    if config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return run.dist.reduce(loss_total) / n_step, grad_norm


def _log_record(run: _Run, loss: float, lr: float, grad_norm: float | None, step_tokens: int, dt: float) -> dict:
    """Log: the metrics line of the step just taken."""
    order = run.order
    return {
        "step": run.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "epoch": order.epoch + order.index / order.batches_per_epoch,
        "tokens": run.tokens_seen,
        "tokens_per_s": step_tokens / dt,
        "elapsed_s": time.perf_counter() - run.t_start,
    }


def _eval(run: _Run, eval_examples: Sequence[Example] | None) -> dict[str, Any] | None:
    """Eval: the eval loss every ``eval_every`` steps and at the end; its metrics line, or None."""
    config, step = run.config, run.step
    if not eval_examples or not ((config.eval_every and step % config.eval_every == 0) or step == run.total_steps):
        return None
    run.eval_loss = evaluate(run.model, eval_examples, config.eval_batch_size, run.pad_token_id, config, run.loss_of)
    logger.info("step %d: eval loss %.4f", step, run.eval_loss)
    return {"step": step, "eval_loss": run.eval_loss}


def _checkpoint(run: _Run, metrics_file: Any) -> None:
    """Checkpoint (write): every ``save_every`` steps and at the end, the metrics synced first."""
    config, step = run.config, run.step
    if not ((config.save_every and step % config.save_every == 0) or step == run.total_steps):
        return
    metrics_file.flush()
    order = run.order
    trainer_state = {
        "data": order.state_dict(),
        "tokens": run.tokens_seen,
        "config": _jsonable(config),
        "run": run.identity,
    }
    extra_rng = {"graph": run.graphed.rng_state()} if run.graphed is not None else None
    with run.dist.saving(run.model, run.optimizer) as (model, optimizer):  # FSDP: the adapter gathered
        run.dist.on_main(partial(os.fsync, metrics_file.fileno()))
        run.dist.on_main(
            partial(
                ckpt_io.save_checkpoint,
                run.out,
                step,
                model,
                optimizer,
                run.scheduler,
                trainer_state,
                config.keep_last,
                extra_rng,
            )
        )


def train(
    model: nn.Module,
    train_examples: Sequence[Example],
    config: TrainConfig,
    eval_examples: Sequence[Example] | None = None,
    pad_token_id: int = 0,
    resume: bool | str | os.PathLike = False,
    overwrite: bool = False,
    allow_changes: bool = False,
    run_info: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
    distributed: Single | None = None,
) -> TrainResult:
    """Fine-tune the model's trainable (adapter) parameters; see the module docstring.

    resume: False starts fresh; True continues from the newest complete checkpoint under
        ``config.output_dir`` (an error when there is none); a path resumes from that checkpoint directory.
        The model must carry the same LoRA settings as the stopped run.
    overwrite, allow_changes, run_info: see minilora.train.run (a directory holding another run is refused
        unless ``overwrite``; a resume whose identity, config + ``run_info``, changed is refused unless
        ``allow_changes``).
    echo: where the log lines go when there is no progress bar (every ``config.print_every`` steps).
    The final step is always checkpointed, so a finished run can be continued with more steps.
    distributed: the other ranks (minilora.train.distributed: DDP or FSDP; None: this process alone). Every
        rank calls train() with the same arguments; rank 0 alone writes files and shows progress.
    """
    t_start = time.perf_counter()
    adapter_parameters(model)  # refuses a model with nothing to train, before any file is written
    plan = choose_path(model, train_examples, config)
    logger.info(plan.describe())
    dist = distributed or Single()
    dist.check(plan.cuda_graph, config.cache_base_weights)
    loss_of = dist.wrap(model, causal_lm_loss)  # DDP / FSDP2 around the model; alone: causal_lm_loss(model, .)
    params = adapter_parameters(model)  # after wrap: FSDP2's sharded parameters
    examples = _data(train_examples, plan)
    identity = run_identity(config, run_info)

    # the run directory: a fresh run, or the run it continues
    out = Path(config.output_dir)
    dist.on_main(lambda: ckpt_io.clean_temp_dirs(out))
    ckpt = _find_checkpoint(out, resume)
    if ckpt is None:
        dist.on_main(lambda: start_fresh(out, identity, overwrite))
    run = _new_run(model, params, examples, config, plan, identity, pad_token_id, t_start, dist, loss_of)
    state, changes = _restore(run, ckpt, plan, allow_changes) if ckpt is not None else (None, [])
    if ckpt is None:
        dist.on_main(lambda: rewrite_metrics(run.metrics_path, []))
    start_step = run.step

    model.train()
    if plan.compile_blocks:
        compile_blocks(model)
    pad_multiple = plan.pack_length or config.graph_pad_multiple  # packed rows: one static length
    if plan.cuda_graph:
        _capture(run, state["rng"] if state is not None else None)
    weight_cache = cached_dequantize(model) if config.cache_base_weights else nullcontext()
    quiet = None if dist.is_main else (lambda line: None)  # one display: rank 0's
    progress = Progress(
        config.progress and dist.is_main, run.total_steps, start_step, config.print_every, quiet or echo, run.device
    )
    warming = plan.compile_blocks or plan.cuda_graph  # the first step compiles and captures
    if warming:
        progress.describe("train (warm-up: compile + capture)")
    run.losses = [m["loss"] for m in read_metrics(run.metrics_path) if "loss" in m]
    metrics_to = run.metrics_path if dist.is_main else os.devnull
    with weight_cache, open(metrics_to, "a", encoding="utf-8") as metrics_file:

        def log(record: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        while run.step < run.total_steps:
            t0 = time.perf_counter()
            micro = [run.order.next_batch() for _ in range(config.grad_accum)]
            n_step = sum(b.n_target_tokens for b in micro)  # of the global batch, on every rank
            if n_step == 0:
                raise ValueError(f"step {run.step}: the batch holds no completion tokens (all labels are -100)")
            step_tokens = sum(b.n_tokens for b in micro)
            micro = [dist.shard(b).to(run.device) for b in micro]  # this rank's rows
            lr = float(run.optimizer.param_groups[0]["lr"])
            loss, grad_norm = _step(run, micro, n_step, pad_multiple)
            run.step += 1
            run.tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            if warming:  # reported apart: steady-state speed leaves it out
                run.warmup_s, warming = dt, False
                logger.info("warm-up (compile + capture, first step): %.1f s", dt)
            run.losses.append(loss)
            record = _log_record(run, loss, lr, grad_norm, step_tokens, dt)
            first = run.warmup_s is not None and run.step == start_step + 1
            if first:
                record["warmup_s"] = run.warmup_s
            if run.step % config.log_every == 0 or run.step == run.total_steps:
                log(record)
            progress.update(run.step, loss, lr, step_tokens)
            if first:
                progress.describe("train")  # steady-state tokens/s from here on
            eval_record = _eval(run, eval_examples)
            if eval_record is not None:
                log(eval_record)
            _checkpoint(run, metrics_file)
    progress.close()
    return _finish(run, plan, start_step if ckpt is not None else None, changes)


def _finish(run: _Run, plan: Any, resumed_from: int | None, changes: list[str]) -> TrainResult:
    """What the run leaves: the adapter, the loss curve, the result."""
    adapter_dir = None
    if run.config.save_final_adapter:
        from minilora.lora import save_adapter

        adapter_dir = run.out / "adapter"
        with run.dist.saving(run.model, run.optimizer) as (model, _):
            run.dist.on_main(lambda: save_adapter(model, adapter_dir))
    metrics = read_metrics(run.metrics_path)
    plot = run.config.plot and run.dist.is_main
    plot_path = plot_loss_curve(metrics, run.out / "loss_curve.png") if plot else None
    run.model.eval()
    return TrainResult(
        steps=run.step,
        final_loss=run.losses[-1] if run.losses else float("nan"),
        eval_loss=run.eval_loss,
        output_dir=run.out,
        adapter_dir=adapter_dir,
        metrics_path=run.metrics_path,
        plot_path=plot_path,
        wall_s=time.perf_counter() - run.t_start,
        tokens=run.tokens_seen,
        resumed_from=resumed_from,
        losses=run.losses,
        path=plan.name,
        warmup_s=run.warmup_s,
        changes=changes,
    )


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
