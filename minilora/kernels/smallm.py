"""Triton kernel: y = x @ W.T for a 4-bit W and a few rows of x (M = 5..64: batched decode, short prompts).

Between the GEMV (gemv.py, M <= 4: CUDA cores, cost grows with M) and dequantize + cuBLAS (writes and
re-reads the whole weight in 16 bits: 263 MB for a 14336x4096 weight against 30 MB packed), this kernel
decodes each packed tile in registers and hands it to the tensor cores, so it reads the packed weight once
and its cost hardly depends on M:

* each program owns BLOCK_N weight rows and a 1/SPLIT_K share of K, walked in BLOCK_KB-byte steps of a
  (BLOCK_N, BLOCK_KB / C, C) byte tile (C = min(32, blocksize / 2): a chunk inside one quantization block);
* each nibble is looked up in the 16-entry code (as gemv.py, inline PTX on the GPU), scaled by its block's
  absmax (double quant: code8[q] * nested_absmax + offset) and rounded to x's dtype: the weight the
  reference's dequantize gives, bit for bit (no FMA fusion), never written to memory;
* x is read as 32-bit words (word j = x[2j], x[2j+1]), split into even and odd columns, and the tile's high
  nibbles (elements 2j) meet the even columns and its low nibbles the odd ones: two tensor-core products
  per step, W as the left operand (BLOCK_N >= 16 rows), x.T on the right (BLOCK_M = 16..64 columns);
* float32 accumulation; with SPLIT_K > 1 each program writes a float32 partial and the host sums them in a
  fixed order (deterministic, no atomics).

Numerics: the reference's (dequantize to x's dtype, then a float32-accumulated matmul) up to the order of
the float32 sums. Timings against bitsandbytes and dequantize + cuBLAS: benchmarks/gpu/NOTES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.state import QuantState
from .dequant import _weight_pointers
from .gemv import _lookup, x_words
from .platform import launch_device, triton_interpreted

SMALL_M_MAX = 64  # rows of x this kernel takes (BLOCK_M = 16, 32 or 64)


# gemv.py's kernel's arguments in its order, less LoRA's and stride_ym, plus SPLIT_K (one launch convention).
@triton.jit
def _small_m_4bit_kernel(
    x_ptr,  # (M, K/2) int32 words: two 16-bit inputs each; row stride stride_xw (in words)
    packed_ptr,  # uint8 (N * K / 2,)
    absmax_ptr,  # float32 (n_blocks,), or uint8 codes with NESTED
    code_ptr,  # float32 (16,)
    nested_absmax_ptr,  # float32                            (NESTED only)
    code8_ptr,  # float32 (256,)                            (NESTED only)
    offset_ptr,  # float32 (1,)                              (NESTED only)
    y_ptr,  # (M, N) in x's dtype; with SPLIT_K > 1, (SPLIT_K, M, N) float32 partial sums
    M,
    N,
    stride_xw,
    HALF_K: tl.constexpr,  # K / 2: bytes per weight row
    HALF_BS: tl.constexpr,  # blocksize / 2: bytes per quantization block
    C: tl.constexpr,  # bytes per chunk; divides HALF_BS
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    X_BF16: tl.constexpr,  # x is bfloat16 (else float16)
    BLOCK_M: tl.constexpr,  # >= 16
    BLOCK_N: tl.constexpr,  # >= 16
    BLOCK_KB: tl.constexpr,  # bytes per row per step (>= 16); multiple of C, divides HALF_K / SPLIT_K
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,  # code lookup by inline PTX (GPU) or tl.load (interpreter)
):
    DT: tl.constexpr = tl.bfloat16 if X_BF16 else tl.float16
    NC: tl.constexpr = BLOCK_KB // C
    K_SPLIT: tl.constexpr = HALF_K // SPLIT_K  # bytes of each row this program walks
    pid_n = tl.program_id(0)
    k_first = tl.program_id(1) * K_SPLIT
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows = output columns
    rn = tl.where(rn < N, rn, N - 1)  # clamp: the last program re-reads row N-1, its store is masked
    chunk = tl.arange(0, NC)
    tile = rn[:, None, None] * HALF_K + chunk[None, :, None] * C + tl.arange(0, C)[None, None, :]  # (BN, NC, C)
    chunk_start = rn[:, None] * HALF_K + chunk[None, :] * C  # (BLOCK_N, NC) first byte of each chunk
    rm = tl.arange(0, BLOCK_M)
    x_rows = tl.minimum(rm, M - 1)[:, None] * stride_xw + tl.arange(0, BLOCK_KB)[None, :]  # (BLOCK_M, BLOCK_KB)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)

    for step in range(0, K_SPLIT, BLOCK_KB):
        k0 = k_first + step
        packed = tl.load(packed_ptr + tile + k0).to(tl.int32)
        blk = (chunk_start + k0) // HALF_BS  # (BLOCK_N, NC) quantization block of each chunk
        if NESTED:
            q = tl.load(absmax_ptr + blk).to(tl.int32)
            absmax = tl.load(code8_ptr + q) * tl.load(nested_absmax_ptr + blk // NESTED_BS) + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk)
        # the dequantized weight, as the reference rounds it: code * absmax in float32, then x's dtype
        w_even = (_lookup(code_ptr, packed >> 4, ASM) * absmax[:, :, None]).to(DT).reshape(BLOCK_N, BLOCK_KB)
        w_odd = (_lookup(code_ptr, packed & 15, ASM) * absmax[:, :, None]).to(DT).reshape(BLOCK_N, BLOCK_KB)
        word = tl.load(x_ptr + x_rows + k0)  # (BLOCK_M, BLOCK_KB) int32; rows >= M repeat row M - 1
        x_even = (word & 0xFFFF).to(tl.int16).to(DT, bitcast=True)  # x[2j]: the low half of word j
        x_odd = (word >> 16).to(tl.int16).to(DT, bitcast=True)  # x[2j + 1]
        acc = tl.dot(w_even, tl.trans(x_even), acc)
        acc = tl.dot(w_odd, tl.trans(x_odd), acc)

    rn_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rn_out[:, None] < N) & (rm[None, :] < M)
    offsets = rm[None, :] * N + rn_out[:, None]  # y is (M, N), contiguous
    if SPLIT_K == 1:
        tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + tl.program_id(1) * M * N + offsets, acc, mask=mask)


def small_m_supported(x: torch.Tensor, state: QuantState) -> bool:
    """2-D weight of whole quantization blocks of >= 32 elements, 16-bit x, M <= SMALL_M_MAX, 32-bit offsets."""
    if len(state.shape) != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    n, k = state.shape
    m = x.numel() // max(1, x.shape[-1])
    return (
        1 <= m <= SMALL_M_MAX
        and state.blocksize >= 32
        and k % state.blocksize == 0
        and (k // 2) % 16 == 0
        and n >= 16
        and state.numel < 2**31
    )


def default_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tiles by shape, from the sweeps of benchmarks/gpu/bench_small_m.py on an H100 (NOTES.md, small-M kernel):
    64 weight rows x 64 bytes per step, 4 warps; K split in 8, except in 4 for a wide output (N >= 2K: enough
    programs already) past 16 rows. On 4096x14336 and 4096x4096 the 8-way split took 0.75-0.85x the time of the
    4-way one at every M in 8..64; on 14336x4096 it won at M <= 16 and lost at 32 and 64. (The launcher halves
    the split and the step where K does not divide.)"""
    split = 4 if n >= 2 * k and m > 16 else 8
    return {"BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": 64, "BLOCK_KB": 64, "SPLIT_K": split,
            "num_warps": 4}  # fmt: skip


def matmul_4bit_small_m(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, config: dict[str, int] | None = None
) -> torch.Tensor:
    """x (..., K) @ W.T for at most SMALL_M_MAX rows of x, W decoded tile by tile into the tensor cores."""
    n, k = state.shape
    assert small_m_supported(x, state), "matmul_4bit_small_m called on an unsupported shape or dtype"
    words = x_words(x, state)  # (M, K/2) int32
    m = words.shape[0]
    cfg = dict(config or default_config(m, n, k))
    half_k, half_bs = k // 2, state.blocksize // 2
    chunk = min(32, half_bs)
    split = cfg["SPLIT_K"]
    block_kb = cfg["BLOCK_KB"]
    while split > 1 and half_k % (split * max(block_kb, chunk)):
        split //= 2
    while block_kb > 16 and (half_k // split) % block_kb:
        block_kb //= 2
    block_kb = max(block_kb, chunk)
    assert (half_k // split) % block_kb == 0 and block_kb % chunk == 0 and block_kb >= 16, (half_k, block_kb, chunk)
    out = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)  # fmt: skip
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    with launch_device(x):
        _small_m_4bit_kernel[grid](
            words,
            *_weight_pointers(packed, state, x.device),
            out,
            m,
            n,
            words.stride(0),
            HALF_K=half_k,
            HALF_BS=half_bs,
            C=chunk,
            NESTED=state.state2 is not None,
            NESTED_BS=state.state2.blocksize if state.state2 is not None else 256,
            X_BF16=x.dtype == torch.bfloat16,
            BLOCK_M=max(cfg["BLOCK_M"], 16, triton.next_power_of_2(m)),
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_KB=block_kb,
            SPLIT_K=split,
            ASM=not triton_interpreted(),
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 2),
            enable_fp_fusion=False,  # code8[q] * nested + offset, and code * absmax, round as the reference's
        )
    y = out.sum(0).to(x.dtype) if split > 1 else out
    return y.reshape(*x.shape[:-1], n)
