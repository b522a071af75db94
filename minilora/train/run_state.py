"""What a run starts from and carries from step to step: the seed, the trainable parameters, AdamW with
its warmup + cosine schedule and the data order, bundled as the RunState the steps of minilora.train.loop
read and advance (minilora.train.resume fills it from a checkpoint).

Schedule (per optimizer step s, 0-based; ``total`` = max_steps):

    s <  warmup:  lr = base * (s + 1) / warmup
    s >= warmup:  lr = base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup))))
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minilora.train.config import TrainConfig
from minilora.train.data import Batch, DataOrder, Example
from minilora.train.distributed import Single


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


@dataclass
class RunState:
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


def new_run(
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
) -> RunState:
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
    return RunState(
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
