"""What one fine-tuning run is given and what it gives back: TrainConfig, TrainResult, and the autocast
that ``TrainConfig.bf16`` asks for. The loop that reads them is minilora.train.loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
    host_embedding: bool | None = None  # keep a frozen, untied input embedding in pinned host memory; None: auto
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


def autocast_for(config: TrainConfig, device: torch.device, cache_enabled: bool = True) -> Any:
    """bf16 autocast when ``config.bf16`` is "yes", or "auto" on CUDA; otherwise a context that does nothing."""
    use = config.bf16 == "yes" or (config.bf16 == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled) if use else nullcontext()
