"""Triton kernel: the GPU's approximate float32 division, the one bitsandbytes' CUDA quantizers use.

bitsandbytes compiles its CUDA kernels with --use_fast_math, so its `1.0f / absmax` (4-bit blockwise scaling)
and `__fdividef(127.0f, absmax)` (int8 row scaling) are not IEEE divisions: they are the hardware's reciprocal
approximation times the numerator (PTX div.approx.ftz.f32), which can differ from the correctly rounded
quotient in the last bit. A scaled weight that sits on a decision boundary then rounds to another code: on
4096x4096 random weights, 254-3,641 FP4 codes and 134-688 int8 codes differed from minilora's IEEE division
(benchmarks/gpu/rounding_probe.py). PyTorch's own division is always IEEE on CUDA, so the approximate one is
taken here, in one elementwise kernel. (div.full.ftz and rcp.approx.ftz followed by a multiply gave the same
codes on the probe's data.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .platform import launch_device

BLOCK = 1024


@triton.jit
def _approx_divide_kernel(den_ptr, out_ptr, numerator, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    den = tl.load(den_ptr + offs, mask=mask, other=1.0)
    num = tl.full((BLOCK,), numerator, tl.float32)
    q = tl.inline_asm_elementwise(
        "div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [num, den], dtype=tl.float32, is_pure=True, pack=1
    )
    tl.store(out_ptr + offs, q, mask=mask)


def approx_divide(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator (float32, elementwise) as bitsandbytes' fast-math CUDA code computes it.

    Denominator: a float32 CUDA tensor (any shape). A zero denominator gives inf, as the hardware does.
    """
    den = denominator.float().contiguous()
    out = torch.empty_like(den)
    n = den.numel()
    if n:
        with launch_device(den):
            _approx_divide_kernel[(triton.cdiv(n, BLOCK),)](den, out, float(numerator), n, BLOCK=BLOCK)
    return out
