"""What a run leaves to read: metrics.jsonl (one JSON record per logged step), the loss curve, log lines.

metrics.jsonl belongs to one run: a fresh run starts it empty (minilora.train.run refuses a directory
holding another run), a resumed run cuts it back to its checkpoint's step, so every step appears once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minilora.io.safe_write import atomic_write_bytes, staged_files

logger = logging.getLogger("minilora.train")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(
    metrics: list[dict[str, Any]], path: str | os.PathLike, title: str = "training loss"
) -> Path | None:
    """Write the train (and eval) loss curve as a PNG; returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve PNG (pip install 'minilora[demo]')")
        return None
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (completion tokens)", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with staged_files(path.parent) as stage:
        fig.savefig(stage(path.name), format="png")
    plt.close(fig)
    return path


def memory_in_use(device: torch.device) -> str:
    """Peak memory so far: CUDA's max_memory_allocated on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA peak)"
    try:
        import resource
    except ImportError:  # not on Windows
        return "n/a"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"


class Progress:
    """A tqdm bar when installed and wanted; otherwise one log line every ``every`` steps (and the last).

    A line reads ``step 20/150 | loss 1.2345 | lr 1.50e-03 | 812 tokens/s | ETA 2m05s | memory 0.61 GiB``.
    Lines go to ``echo`` (the CLI prints them) or, without one, to the logger at INFO.
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        every: int = 10,
        echo: Callable[[str], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.bar = None
        self.total, self.every, self.device = total, max(1, every), device or torch.device("cpu")
        self.echo = echo or logger.info
        self.t0, self.first = time.perf_counter(), initial
        self.window_tokens, self.window_t0 = 0, self.t0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        """Name the phase (e.g. the compile + capture warm-up); the speed window restarts after it."""
        if self.bar is not None:
            self.bar.set_description(text)
        self.window_tokens, self.window_t0 = 0, time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.window_tokens += tokens
        now = time.perf_counter()
        if self.bar is not None:
            tok_s = self.window_tokens / max(now - self.window_t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
            self.bar.update(1)
            self.window_tokens, self.window_t0 = 0, now
            return
        if step % self.every and step != self.total:
            return
        tok_s = self.window_tokens / max(now - self.window_t0, 1e-9)
        eta = (now - self.t0) / max(step - self.first, 1) * (self.total - step)
        self.echo(
            f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tokens/s | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s | memory {memory_in_use(self.device)}"
        )
        self.window_tokens, self.window_t0 = 0, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rewrite_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
