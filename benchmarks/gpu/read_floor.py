"""Diagnostic: the fastest a kernel can merely *read* a gate_proj-sized packed weight (30.3 MB) on this GPU.

Issue 7 asks the M = 1 decode to be 4x faster than bitsandbytes' gemv (30.4 us in decode-h200.md): 7.6 us.
No GEMV can beat a kernel that reads the same bytes and does almost nothing with them. This measures such
kernels, timed as bench_decode.py times the GEMV ("rot": a CUDA graph cycling through > 150 MB of copies, so
every call reads HBM): a Triton streaming reduction (128-bit loads, xor into one word per program; tiles and
warps swept) and torch's own int32 sum.

    python3 -m benchmarks.gpu.read_floor
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.gpu.bench_decode import graph_time
from benchmarks.gpu.common import bench_us

NBYTES = 14336 * 4096 // 2 + 14336 * 4096 // 64  # packed NF4 codes + 8-bit absmax codes of gate_proj


@triton.jit
def _xor_read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(src_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(words, axis=0))


def main() -> None:
    copies = 8  # 8 x 30 MB > 3 x the 50 MB L2
    bufs = [torch.randint(-(2**31), 2**31 - 1, (NBYTES // 4,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    n_words = bufs[0].numel()
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() * 2 / (bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e12
    src = dst = None
    floor = NBYTES / (copy_tbs * 1e12) * 1e6
    print(f"bytes {NBYTES / 1e6:.1f} MB; copy bandwidth {copy_tbs:.2f} TB/s -> {floor:.2f} us at copy speed")
    rows = []
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            outs = [torch.empty(triton.cdiv(n_words, block), dtype=torch.int32, device="cuda") for _ in range(copies)]
            grid = (triton.cdiv(n_words, block),)
            calls = [
                lambda src=src_k, out=out_k, blk=block, nw=warps, g=grid: _xor_read_kernel[g](
                    src, out, n_words, BLOCK=blk, num_warps=nw
                )
                for src_k, out_k in zip(bufs, outs, strict=True)
            ]
            us = graph_time(calls, reps=4)
            rows.append((f"triton xor-read BLOCK={block} warps={warps}", us))
    sums = [lambda b=b: b.sum() for b in bufs]
    rows.append(("torch int32 sum", graph_time(sums, reps=4)))
    for name, us in sorted(rows, key=lambda r: r[1]):
        print(f"{name:<40} {us:7.2f} us  ({NBYTES / us / 1e6:.2f} TB/s, {100 * floor / us:.0f}% of copy speed)")
    best = min(us for _, us in rows)
    print(f"best read of {NBYTES / 1e6:.1f} MB: {best:.2f} us; issue 7's M=1 target 7.6 us is {7.6 / best:.2f}x it")


if __name__ == "__main__":
    main()
