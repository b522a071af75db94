"""Resume: the checkpoint a run continues from, and every state of it put back into the RunState.

A checkpoint (written by minilora.train.checkpoint) holds adapter, optimizer, scheduler, every RNG and the
data position; ``restore`` puts them all back, so a run killed and resumed ends as one never stopped.
It refuses a checkpoint of another run (minilora.train.run), adapts the optimizer to the other mode
(eager <-> CUDA graph) and, with --allow-changes, to this run's hyper-parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from minilora.train import checkpoint as ckpt_io
from minilora.train.config import TrainConfig
from minilora.train.metrics import read_metrics, rewrite_metrics
from minilora.train.run import RunError, check_resume
from minilora.train.run_state import RunState


def find_checkpoint(out: Path, resume: bool | str | os.PathLike) -> ckpt_io.CheckpointPaths | None:
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


def restore(run: RunState, ckpt: ckpt_io.CheckpointPaths, plan: Any, allow_changes: bool) -> tuple[dict, list[str]]:
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
    return state, changes


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
