"""The fine-tuning loop: AdamW on the adapter only, warmup + cosine, accumulation, clipping, checkpoints.

QLoRA (Dettmers et al. 2023, section 3) trains only the LoRA matrices; the (quantized) base is frozen.
One optimizer step here is

    for each of grad_accum micro-batches:       loss_i = sum of token cross-entropies / N_step
        loss_i.backward()                        (N_step = completion tokens in the whole step)
    clip_grad_norm_(adapter params, max_grad_norm)
    AdamW step (lr from linear warmup then cosine decay), zero grads

so the step's loss is the mean over every completion token of the step, whatever the accumulation.
``train`` reads as its named steps: data, step, log, eval, checkpoint. Around it: TrainConfig and
TrainResult (minilora.train.config), the loss and ``evaluate`` (minilora.train.lm_loss), the optimizer,
schedule and data order a run starts from (minilora.train.run_state), resuming (minilora.train.resume).

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
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilora.train import checkpoint as ckpt_io
from minilora.train.config import TrainConfig, TrainResult, autocast_for
from minilora.train.data import Batch, Example
from minilora.train.distributed import Single
from minilora.train.fast import choose_path, compile_blocks, pack_first_fit
from minilora.train.lm_loss import (
    CHUNKED_LOGITS,
    accumulated_causal_lm_loss,
    causal_lm_loss,
    evaluate,
    pad_micro_batches,
)
from minilora.train.metrics import Progress, plot_loss_curve, read_metrics, rewrite_metrics
from minilora.train.offload import embedding_on_host
from minilora.train.resume import find_checkpoint, restore
from minilora.train.run import run_identity, start_fresh
from minilora.train.run_state import RunState, adapter_parameters, new_run, seed_everything, warmup_cosine
from minilora.train.weight_cache import cached_dequantize

__all__ = [  # train, and the names callers have imported from here since before the split
    "CHUNKED_LOGITS",
    "TrainConfig",
    "TrainResult",
    "accumulated_causal_lm_loss",
    "adapter_parameters",
    "causal_lm_loss",
    "evaluate",
    "pad_micro_batches",
    "read_metrics",
    "seed_everything",
    "train",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)


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
    plan = choose_path(model, train_examples, config, distributed=distributed is not None)
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
    ckpt = find_checkpoint(out, resume)
    if ckpt is None:
        dist.on_main(lambda: start_fresh(out, identity, overwrite))
    run = new_run(model, params, examples, config, plan, identity, pad_token_id, t_start, dist, loss_of)
    state, changes = restore(run, ckpt, plan, allow_changes) if ckpt is not None else (None, [])
    if ckpt is None:
        dist.on_main(lambda: rewrite_metrics(run.metrics_path, []))
    else:
        logger.info("resumed from %s (step %d)", ckpt.directory, run.step)
    start_step = run.step

    model.train()
    if plan.compile_blocks:
        compile_blocks(model)
    pad_multiple = plan.pack_length or config.graph_pad_multiple  # packed rows: one static length
    host_embedding = embedding_on_host(model) if plan.host_embedding else nullcontext()
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
    with host_embedding, weight_cache, open(metrics_to, "a", encoding="utf-8") as metrics_file:
        if plan.cuda_graph:  # after the swap: the step object sees the model's parameters as they stay for the run
            _capture(run, state["rng"] if state is not None else None)

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
        if plan.host_embedding:  # the table returns to the card: first free what only the steps needed
            release_step_memory(run)
    progress.close()
    return _finish(run, plan, start_step if ckpt is not None else None, changes)


def _data(train_examples: Sequence[Example], plan: Any) -> Sequence[Example]:
    """Data: the examples as the chosen path reads them (packed into rows of ``plan.pack_length``)."""
    return pack_first_fit(train_examples, plan.pack_length) if plan.pack_length else train_examples


def _capture(run: RunState, rng: dict[str, Any] | None) -> None:
    """Step (CUDA path): the whole optimizer step as one graph, its dropout streams restored on resume."""
    from minilora.train.cuda_graph import CUDAGraphStep

    config, device = run.config, run.device

    def graph_loss(m: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        # autocast's weight cache would hold tensors of the capture: off inside graphs
        return accumulated_causal_lm_loss(m, *inputs, autocast=autocast_for(config, device, cache_enabled=False))

    run.graphed = CUDAGraphStep(
        run.model, run.optimizer, graph_loss, max_grad_norm=config.max_grad_norm, seed=config.seed, backward=False
    )
    if rng is not None:
        run.graphed.set_rng_state(rng.get("graph", {}))


def _step(run: RunState, micro: list[Batch], n_step: int, pad_multiple: int) -> tuple[float, float | None]:
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
            with autocast_for(config, run.device):
                loss_sum, _ = run.loss_of(batch)
            (loss_sum / n_step).backward()
        loss_total += float(loss_sum.detach())
    if config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return run.dist.reduce(loss_total) / n_step, grad_norm


def _log_record(run: RunState, loss: float, lr: float, grad_norm: float | None, step_tokens: int, dt: float) -> dict:
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


def _eval(run: RunState, eval_examples: Sequence[Example] | None) -> dict[str, Any] | None:
    """Eval: the eval loss every ``eval_every`` steps and at the end; its metrics line, or None."""
    config, step = run.config, run.step
    if not eval_examples or not ((config.eval_every and step % config.eval_every == 0) or step == run.total_steps):
        return None
    run.eval_loss = evaluate(run.model, eval_examples, config.eval_batch_size, run.pad_token_id, config, run.loss_of)
    logger.info("step %d: eval loss %.4f", step, run.eval_loss)
    return {"step": step, "eval_loss": run.eval_loss}


def _checkpoint(run: RunState, metrics_file: Any) -> None:
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


def release_step_memory(run: RunState) -> None:
    """After the last step (checkpointed): drop the step's CUDA graph, optimizer state and gradients, so that the
    input embedding coming back from host memory does not raise the run's peak (it would by 0.46 GB at 8B)."""
    run.graphed = None
    run.optimizer.state.clear()
    for p in run.params:
        p.grad = None


def _finish(run: RunState, plan: Any, resumed_from: int | None, changes: list[str]) -> TrainResult:
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
