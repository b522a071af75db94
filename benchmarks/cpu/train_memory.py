"""Suite `train_memory`: minilora.memory_train's estimate of a training step against the measured peak RSS.

SmolLM2-135M-Instruct, NF4 + double quant, float32 compute, LoRA r=32 on q,k,v,o, AdamW, batch 4 x 182
random tokens (every position learned), with and without gradient checkpointing. Each case runs in its
own process (benchmarks.cpu.child): load and add LoRA, then reset the kernel's high-water mark and run
two training steps as minilora.train.loop runs them (causal_lm_loss, backward, clipping, AdamW,
zero_grad); measured = VmHWM - RSS before the steps. The estimate compared is the same growth: the
total minus what the loaded model already holds (weights, quant state, adapter).

The estimate counts live tensors. RSS also holds what glibc's malloc keeps after a free: with its default
settings the mmap threshold adapts up to 32 MiB, so freed activations of a few MB stay in the heap and
every new allocation pattern grows it. Each case is therefore measured twice: with glibc's defaults (what
`top` shows) and with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` (every tensor above 64 KiB
its own mapping, returned at free: RSS follows the live tensors). The 15% criterion is read on the second.

    python -m benchmarks train_memory        # -> benchmarks/results/train-memory-cpu.{md,json}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import PeakRSS, Report, progress, run_child

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
RESIDENT = ("weights", "quant state", "adapter (fp32)")


def child_step(directory: str, batch: int, seq: int, checkpointing: bool, steps: int = 2) -> dict[str, Any]:
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora
    from minilora.train.data import Batch
    from minilora.train.loop import causal_lm_loss

    model = from_pretrained(directory, quantize="nf4")
    torch.manual_seed(0)
    add_lora(model, r=32, alpha=64, target_modules=list(TARGETS))
    model.gradient_checkpointing = checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = Batch(ids, ids.clone(), torch.ones_like(ids))
    losses = []
    with PeakRSS() as peak:
        for _ in range(steps):
            loss_sum, n = causal_lm_loss(model, data)
            (loss_sum / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss_sum.detach()) / n)
    return {"rss_before": peak.start, "peak": peak.total, "growth": peak.extra, "losses": losses}


def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    from minilora.memory_train import TrainSetup, train_footprint

    if device != "cpu":
        raise ValueError("train_memory measures the CPU; the GPU version is benchmarks/gpu/train_memory.py")
    report = Report("train-memory", argv, out, smoke, device)
    if smoke:
        from benchmarks.harness import tiny_checkpoint

        directory, batch, seq = str(tiny_checkpoint(Path(out) / "tiny-llama")), 2, 32
    else:
        from benchmarks.cpu.quality import smollm2_dir

        directory, batch, seq = str(smollm2_dir()), 4, 182
    rows, cases = [], []
    for gc in progress([False, True], "training memory"):
        setup = TrainSetup(r=32, targets=TARGETS, batch=batch, seq=seq, gradient_checkpointing=gc)
        fp = train_footprint(directory, setup)
        estimate = fp.total - sum(fp.items[k] for k in RESIDENT)
        task = {"directory": directory, "batch": batch, "seq": seq, "checkpointing": gc}
        default = run_child("train_memory", "step", task)
        saved_env = {k: os.environ.get(k) for k in TRIM_ENV}
        os.environ.update(TRIM_ENV)
        try:
            trimmed = run_child("train_memory", "step", task)
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        error = estimate / trimmed["growth"] - 1
        case = {"gradient_checkpointing": gc, "estimate_items": fp.items, "estimate_growth": estimate}
        case.update(estimate_total=fp.total, glibc_default=default, malloc_trimmed=trimmed, relative_error=error)
        case["relative_error_glibc_default"] = estimate / default["growth"] - 1
        cases.append(case)
        rows.append([
            "with" if gc else "without", estimate / 1e6, trimmed["growth"] / 1e6, f"{100 * error:+.1f}%",
            "within 15%" if abs(error) <= 0.15 else "OFF by more than 15%", default["growth"] / 1e6,
        ])  # fmt: skip
    report.data["cases"] = cases
    report.data["settings"] = {"directory": directory, "batch": batch, "seq": seq, "r": 32, "targets": TARGETS}
    report.table(
        f"Training step memory, {'tiny random Llama' if smoke else 'SmolLM2-135M-Instruct'} NF4+DQ, LoRA r=32 "
        f"q,k,v,o, batch {batch} x {seq}, float32",
        [
            "gradient checkpointing",
            "estimated growth MB",
            "measured growth MB (malloc trimmed)",
            "error",
            "verdict",
            "measured growth MB (glibc defaults)",
        ],  # fmt: skip
        rows,
        note="growth = what two training steps add at their peak above the loaded model (VmHWM - RSS before; "
        "estimate: minilora.memory_train total minus weights, quant state and adapter). Each case in its own "
        "process; 'malloc trimmed' = MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, so RSS follows live "
        "tensors; with glibc's defaults RSS also keeps freed heap memory (see the module docstring).",
    )
    for case in cases:
        items = [[k, v / 1e6] for k, v in case["estimate_items"].items()]
        report.table(
            f"Estimate per item, {'with' if case['gradient_checkpointing'] else 'without'} checkpointing",
            ["item", "MB"],
            items,
        )
    return report.write()
