"""Triton kernel: rows of an embedding table read from pinned host memory by a CUDA kernel (zero-copy).

A frozen input embedding is the largest tensor a QLoRA step keeps on the card that it barely reads:
Llama-3.1-8B's is 128256 x 4096 bf16, 1.05 GB, of which a step of 4 x 182 tokens reads 728 rows (6 MB).
With unified virtual addressing a pinned host tensor's pointer is valid on the GPU, so a kernel can load
its rows over PCIe directly, inside a captured CUDA graph too (the ids change between replays, the table
does not move). One program copies one row, BLOCK_C columns at a time.

Measured on an H100 by a one-off probe, since folded in here (benchmarks/results/probe-host-embedding-h100.json):
728 rows in 192 us, 2048 in 547 us, bit for bit the device table's rows (10 and 18 us from device
memory): ~0.2% of a training step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import launch_device


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    token = tl.load(ids_ptr + row).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        values = tl.load(table_ptr + token * C + cols, mask=cols < C)
        tl.store(out_ptr + row.to(tl.int64) * C + cols, values, mask=cols < C)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] (ids.shape + (C,)) on ids' device, table (V, C) contiguous, possibly in pinned host memory."""
    flat = ids.reshape(-1)
    out = torch.empty((flat.numel(), table.shape[1]), dtype=table.dtype, device=ids.device)
    if flat.numel():
        with launch_device(ids):
            _gather_rows_kernel[(flat.numel(),)](table, flat, out, C=table.shape[1], BLOCK_C=1024)
    return out.reshape(*ids.shape, table.shape[1])
