"""Diagnostic: where minilora's load-to-GPU time goes (loading-h200: 3.2x transformers + bitsandbytes).

Writes the loading suite's 349M-parameter float32 checkpoint, loads it once to warm up, then times the phases of
`from_pretrained(..., quantize="nf4", double_quant=True, dtype=bfloat16, device="cuda")` by wrapping the
loader's steps: reading each tensor from its file, the cast to bfloat16, the host-to-device copy, quantizing.

    python3 -m benchmarks.gpu.loading_probe
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import torch

import minilora.loading as loading
from benchmarks.cpu.loading import FULL, SMOKE, write_checkpoint
from minilora.io.checkpoint import CheckpointReader

spent: dict[str, float] = collections.defaultdict(float)


def timed(name, fn):
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        spent[name] += time.perf_counter() - t0
        return out

    return wrapper


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / "ckpt", FULL, shard_bytes=300_000_000)
        write_checkpoint(Path(tmp) / "warm", SMOKE, shard_bytes=10**9)
        kwargs = dict(quantize="nf4", double_quant=True, dtype=torch.bfloat16, device="cuda")
        loading.from_pretrained(Path(tmp) / "warm", **kwargs)
        for _ in range(2):  # the second run: file pages cached, as in the suite's timed load
            spent.clear()
            CheckpointReader.get = timed("read file (CheckpointReader.get)", original_get)
            loading._quantize_linear = timed("quantize (Linear4bit.from_weight)", original_quantize)
            loading._read = timed("_read: file + cast + copy to GPU", original_read)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model = loading.from_pretrained(Path(tmp) / "ckpt", **kwargs)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            del model
        for name, s in spent.items():
            print(f"{name:<40} {s:8.3f} s")
        print(f"{'total from_pretrained':<40} {total:8.3f} s")


original_get = CheckpointReader.get
original_quantize = loading._quantize_linear
original_read = loading._read

if __name__ == "__main__":
    main()
