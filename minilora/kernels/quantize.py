"""Triton kernel: blockwise NF4/FP4 quantization on the GPU, storing the bytes bitsandbytes' CUDA kernel stores.

One launch reads the weight once and writes the packed codes and the absmax, where the plain-PyTorch rule
(minilora/quant/bnb_cuda_rule.py, rounding="bnb_cuda") takes a dozen passes over float32 copies. Per block of
`blocksize` values, as that rule (and bitsandbytes' kernel) does:

    subnormal inputs -> 0;  absmax = max |x|;  r = 1 / absmax by the GPU's approximate division;
    s = x * r (subnormal -> 0);  rank = how many decision boundaries lie strictly below s
    (FP4: below |s|, then bit 3 set for s < 0);  code index = rank_to_index[rank];
    byte j = index(2j) << 4 | index(2j + 1)

An all-zero block has r = inf and s = NaN, which passes no boundary: index 0, as on bitsandbytes' GPU path.
Values past the end of the tensor are read as 0 (the padding nibble of an odd count is the code of 0 scaled
in its block). Program p owns NB consecutive blocks; even and odd elements are loaded as two (NB, blocksize/2)
tiles, so each pair of codes meets in one lane. Tested byte for byte against the PyTorch rule and bitsandbytes'
CUDA kernel: tests/kernels/test_gpu_bnb_parity.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..quant import blockwise, bnb_cuda_rule
from ..quant.state import QuantState
from .platform import launch_device

FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # 2**-126: below it, fast-math code sees zero
TILE_VALUES = 4096  # values per program: NB = TILE_VALUES // blocksize blocks (at least 1)


@triton.jit
def _flush(v):
    return tl.where(tl.abs(v) < FLT_MIN, 0.0, v)


@triton.jit
def _approx_reciprocal(v):
    """1 / v by the GPU's approximate division (div.approx.ftz.f32), as bitsandbytes' fast-math kernels."""
    one = tl.full(v.shape, 1.0, tl.float32)
    return tl.inline_asm_elementwise(
        "div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [one, v], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _code_index(s, bounds_ptr, lookup_ptr, NUM_BOUNDS: tl.constexpr, SIGN_FIRST: tl.constexpr):
    """Code index (int32) of scaled values s: rank among the boundaries, mapped through the lookup table."""
    if SIGN_FIRST:
        v = tl.abs(s)
    else:
        v = s
    rank = tl.zeros(s.shape, dtype=tl.int32)
    for i in tl.static_range(NUM_BOUNDS):
        rank += (v > tl.load(bounds_ptr + i)).to(tl.int32)
    index = tl.load(lookup_ptr + rank)
    if SIGN_FIRST:
        index += tl.where(s < 0, 8, 0)
    return index


@triton.jit
def _quantize_4bit_kernel(
    x_ptr,  # (n,) float32 / float16 / bfloat16
    packed_ptr,  # (ceil(n / 2),) uint8
    absmax_ptr,  # (n_blocks,) float32
    bounds_ptr,  # (NUM_BOUNDS,) float32, ascending
    lookup_ptr,  # (NUM_BOUNDS + 1,) int32: rank -> code index
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    NUM_BOUNDS: tl.constexpr,
    SIGN_FIRST: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * NB + tl.arange(0, NB)  # (NB,)
    pair = tl.arange(0, HALF)  # (HALF,)
    first = blocks[:, None].to(tl.int64) * BLOCKSIZE + 2 * pair[None, :]  # (NB, HALF): element 2j of each block
    xe = _flush(tl.load(x_ptr + first, mask=first < n, other=0.0).to(tl.float32))
    xo = _flush(tl.load(x_ptr + first + 1, mask=first + 1 < n, other=0.0).to(tl.float32))
    absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))  # (NB,)
    recip = _approx_reciprocal(absmax)
    # A NaN input must reach the absmax (the caller checks only the absmax for finiteness), but a max
    # reduction drops NaNs: count them apart.
    nans = tl.sum((xe != xe).to(tl.int32), axis=1) + tl.sum((xo != xo).to(tl.int32), axis=1)
    absmax = tl.where(nans > 0, float("nan"), absmax)
    high = _code_index(_flush(xe * recip[:, None]), bounds_ptr, lookup_ptr, NUM_BOUNDS, SIGN_FIRST)
    low = _code_index(_flush(xo * recip[:, None]), bounds_ptr, lookup_ptr, NUM_BOUNDS, SIGN_FIRST)
    byte = ((high << 4) | low).to(tl.uint8)
    tl.store(packed_ptr + blocks[:, None].to(tl.int64) * HALF + pair[None, :], byte, mask=first < n)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


@functools.cache
def _tables(
    boundaries: tuple[float, ...], rank_to_index: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's tables on the device, copied once (a host-to-device copy per call would cost more than the
    kernel on a small weight)."""
    bounds = torch.tensor(boundaries, dtype=torch.float32, device=device)
    return bounds, torch.tensor(rank_to_index, dtype=torch.int32, device=device)


def quantize_4bit_triton(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """`blockwise.quantize_4bit(x, ..., rounding="bnb_cuda")` of a CUDA tensor: the codes (and the nested absmax
    codes) in one Triton launch each, the same bytes."""
    blockwise.check_quantize_args(x, blocksize, quant_type)
    boundaries, rank_to_index = bnb_cuda_rule.boundaries(quant_type)
    packed, absmax = _quantize_4bit(x.detach(), blocksize, boundaries, rank_to_index, quant_type == "fp4")
    blockwise.check_float_tensor(x, "quantize_4bit", absmax=absmax)  # the kernel passes NaN/Inf into the absmax
    return packed, blockwise.new_state(
        x, absmax, blocksize, quant_type, compress_statistics, "bnb_cuda", quantize_8bit_triton
    )


def _quantize_4bit(
    x: torch.Tensor, blocksize: int, boundaries: list[float], rank_to_index: list[int], sign_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 ((n + 1) // 2, 1), absmax float32 (n_blocks,)) of a CUDA tensor, by bitsandbytes' CUDA rule.

    boundaries / rank_to_index / sign_first: the rule's tables (quant.bnb_cuda_rule.boundaries).
    """
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    bounds, lookup = _tables(tuple(boundaries), tuple(rank_to_index), x.device)
    nb = max(1, TILE_VALUES // blocksize)
    if n:
        with launch_device(x):
            _quantize_4bit_kernel[(triton.cdiv(n_blocks, nb),)](
                flat,
                packed,
                absmax,
                bounds,
                lookup,
                n,
                n_blocks,
                BLOCKSIZE=blocksize,
                NB=nb,
                NUM_BOUNDS=len(boundaries),
                SIGN_FIRST=sign_first,
                num_warps=4,
            )
    return packed.unsqueeze(1), absmax


@triton.jit
def _quantize_8bit_kernel(
    x_ptr,  # (n,) float32
    q_ptr,  # (n,) uint8
    absmax_ptr,  # (n_blocks,) float32
    code_ptr,  # (256,) float32, ascending
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
):
    """8-bit blockwise codes (double quantization) by bitsandbytes' CUDA rule: the binary search of
    quant.bnb_cuda_rule.code_index_8bit, on scales made as in the 4-bit kernel."""
    blocks = tl.program_id(0) * NB + tl.arange(0, NB)  # (NB,)
    offs = blocks[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (NB, BLOCKSIZE)
    x = _flush(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
    absmax = tl.max(tl.abs(x), axis=1)
    s = _flush(x * _approx_reciprocal(absmax)[:, None])
    absmax = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), absmax)  # a max drops NaNs
    pivot = tl.full(s.shape, 127, tl.int32)
    lower_pivot = tl.zeros(s.shape, tl.int32)
    upper_pivot = tl.full(s.shape, 255, tl.int32)
    lower = tl.full(s.shape, -1.0, tl.float32)
    upper = tl.full(s.shape, 1.0, tl.float32)
    value = tl.load(code_ptr + pivot)
    for k in tl.static_range(7):
        step = 64 >> k
        above = s > value
        lower_pivot = tl.where(above, pivot, lower_pivot)
        lower = tl.where(above, value, lower)
        upper_pivot = tl.where(above, upper_pivot, pivot)
        upper = tl.where(above, upper, value)
        pivot = tl.where(above, pivot + step, pivot - step)
        value = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr), lower)
    go_up = s > (upper + value) * 0.5
    go_down = s < (lower + value) * 0.5
    q = tl.where(s > value, tl.where(go_up, upper_pivot, pivot), tl.where(go_down, lower_pivot, pivot))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=offs < n)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


def quantize_8bit_triton(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (n,), absmax float32 (n_blocks,)) of a CUDA tensor into a sorted 256-value code, by
    bitsandbytes' CUDA rule (blockwise.quantize_blockwise_8bit(..., rounding="bnb_cuda"))."""
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    nb = max(1, TILE_VALUES // blocksize)
    if n:
        with launch_device(x):
            _quantize_8bit_kernel[(triton.cdiv(n_blocks, nb),)](
                flat, q, absmax, code.float().contiguous(), n, n_blocks, BLOCKSIZE=blocksize, NB=nb, num_warps=4
            )
    return q, absmax
