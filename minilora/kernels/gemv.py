"""Triton kernel: memory-bound 4-bit matrix-vector product for decode, y = x @ W.T with M = 1..16 rows of x.

At decode the whole cost is reading W once. For a 14336x4096 NF4 weight that is 29.4 MB of packed codes
(+ 0.9 MB absmax codes): ~7 us at the H200's ~4.2 TB/s. bf16 `F.linear` reads 117 MB; dequantize +
F.linear reads the packed weight, writes and re-reads 117 MB. This kernel reads the packed bytes once.

Layout (W is (N, K), row n holds K/2 bytes; byte j holds element 2j in its high nibble, 2j+1 in its low):

* each program owns BLOCK_N output rows (weight rows) and walks K in steps of BLOCK_KB bytes;
* a step loads a (BLOCK_N, BLOCK_KB / C, C) tile of packed bytes (C = min(32, blocksize / 2) bytes: a
  chunk inside one quantization block), 16 contiguous bytes per thread: 128-bit loads, each byte once;
  the next step's tile is loaded before this one is used (two tiles in flight per thread);
* the two nibbles are decoded through the 16-entry code table (64 bytes, one L1 line: a gather is one
  wavefront) into float32;
* x is read as 32-bit words, one word per packed byte: word j holds x[2j] (low half) and x[2j+1] (high
  half), so x[2j] pairs with the high nibble of byte j and x[2j+1] with the low one, with no shuffles.
  bf16 -> float32 is a shift; x (a few KB) stays in L1/L2 and is shared by the BLOCK_N rows of a thread;
* products are summed in float32 per chunk, the chunk sum is scaled once by its block's absmax (for
  double quant: code8[q] * nested_absmax + offset, as the reference), and accumulated in float32;
* for M > 1 the decoded tile is reused for every row of x (BLOCK_M <= 16, unrolled);
* optionally, a LoRA adapter's term in the epilogue: y += scaling * h @ B.T, with h = x @ A.T (M, r) computed
  beforehand and B (N, r) read for the program's rows only (BLOCK_N x r values): an unmerged adapter costs
  its A product, not a B product plus a pointwise scale-and-add (benchmarks/gpu/NOTES.md, adapter decode).
  The A product is `lora_down`: one program per row of A, one launch (cuBLAS took a split-K GEMM and a
  reduction, ~5.9 us, for these 256 KB).

Numerics: sum_k code[q_k] * absmax_b * x_k, all in float32, one bf16/fp16 rounding at the end. The
reference rounds each dequantized weight to the compute dtype first, so the two differ by that weight
rounding: ~1e-3 relative, inside bf16 tolerance (tests/kernels/test_gpu.py). Versions and timings:
benchmarks/gpu/NOTES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.state import QuantState
from .dequant import _weight_pointers
from .platform import launch_device, triton_interpreted

# Largest M served by this kernel (BLOCK_M = next power of two of M, unrolled inside the kernel).
GEMV_MAX_M = 16


@triton.jit
def _lookup(table_ptr, idx, ASM: tl.constexpr):
    """table[idx] (float32) for an int32 index tensor, in idx's register layout.

    A plain `tl.load(table_ptr + idx)` is a gather, for which Triton's coalescing pass picks a layout of
    one element per thread and converts the packed bytes into it through shared memory. The same
    load written as inline PTX is an elementwise op: it keeps the 16-bytes-per-thread layout of the
    packed tile, and the 64-byte table stays in L1 (ld.global.nc).
    """
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 a; mul.wide.u32 a, $1, 4; add.s64 a, a, $2; ld.global.nc.f32 $0, [a]; }",
            "=r,r,l",
            [idx, table_ptr.to(tl.int64, bitcast=True)],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        return tl.load(table_ptr + idx)


@triton.jit
def _load_x(ptr, ASM: tl.constexpr):
    """tl.load(ptr) of int32 words, 4 contiguous words per 128-bit load, in the layout of the consumer.

    A plain load of x gets its own coalesced layout (2 words per thread) and is then moved into the
    packed tile's layout through shared memory; as inline PTX it is elementwise and keeps the consumer's
    16-contiguous-words-per-thread layout: 4 vector loads (L1 hits) per thread, no barrier.
    """
    if ASM:
        return tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
            "=r,=r,=r,=r,l,l,l,l",
            [ptr.to(tl.int64, bitcast=True)],
            dtype=tl.int32,
            is_pure=True,
            pack=4,
        )
    else:
        return tl.load(ptr)


@triton.jit
def _gemv_4bit_kernel(
    x_ptr,  # (M, K/2) int32 words: two 16-bit inputs each; row stride stride_xw (in words)
    packed_ptr,  # uint8 (N * K / 2,)
    absmax_ptr,  # float32 (n_blocks,), or uint8 codes with NESTED
    code_ptr,  # float32 (16,)
    nested_absmax_ptr,  # float32                            (NESTED only)
    code8_ptr,  # float32 (256,)                            (NESTED only)
    offset_ptr,  # float32 (1,)                              (NESTED only)
    y_ptr,  # (M, N) in x's dtype, row stride stride_ym
    h_ptr,  # (M, R) x @ A.T, row stride stride_hm     (LORA only)
    b_ptr,  # (N, R) lora_B weight, contiguous          (LORA only)
    scaling,  # float: alpha / r                       (LORA only)
    M,
    N,
    stride_xw,
    stride_ym,
    stride_hm,
    HALF_K: tl.constexpr,  # K / 2: bytes per weight row
    HALF_BS: tl.constexpr,  # blocksize / 2: bytes per quantization block
    C: tl.constexpr,  # bytes per chunk; divides HALF_BS
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    X_BF16: tl.constexpr,  # x is bfloat16 (else float16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # bytes per row per step; multiple of C, divides HALF_K
    ASM: tl.constexpr,  # code lookup by inline PTX (GPU) or tl.load (interpreter)
    LORA: tl.constexpr,  # add scaling * h @ B.T
    R: tl.constexpr,  # the adapter's rank (LORA only)
    R_PAD: tl.constexpr,  # next power of two of R
):
    NC: tl.constexpr = BLOCK_KB // C  # chunks per row per step
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows = output columns
    rn = tl.where(rn < N, rn, N - 1)  # clamp: the last program re-reads row N-1, its store is masked
    chunk = tl.arange(0, NC)  # (NC,)
    byte = tl.arange(0, C)  # (C,)
    # (BLOCK_N, NC, C) byte offsets of one step, relative to the step's first byte
    tile = rn[:, None, None] * HALF_K + chunk[None, :, None] * C + byte[None, None, :]
    xcol = chunk[:, None] * C + byte[None, :]  # (NC, C) word offsets into a row of x
    chunk_start = rn[:, None] * HALF_K + chunk[None, :] * C  # (BLOCK_N, NC) first byte of each chunk
    cols = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    # Per (row, chunk, m) partial sums; the sum over chunks (spread over warps) waits until the end.
    acc = tl.zeros((BLOCK_N, NC, BLOCK_M), dtype=tl.float32)

    nxt = tl.load(packed_ptr + tile)  # prefetch step 0
    for k0 in range(0, HALF_K, BLOCK_KB):
        packed = nxt.to(tl.int32)
        if k0 + BLOCK_KB < HALF_K:  # load the next step's bytes before using this one's
            nxt = tl.load(packed_ptr + tile + (k0 + BLOCK_KB))
        hi = _lookup(code_ptr, packed >> 4, ASM)  # (BLOCK_N, NC, C) float32: element 2j
        lo = _lookup(code_ptr, packed & 15, ASM)  # element 2j + 1

        blk = (chunk_start + k0) // HALF_BS  # (BLOCK_N, NC) quantization block of each chunk
        if NESTED:
            q = tl.load(absmax_ptr + blk).to(tl.int32)
            absmax = tl.load(code8_ptr + q) * tl.load(nested_absmax_ptr + blk // NESTED_BS) + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk)

        for m in tl.static_range(BLOCK_M):
            # rows m >= M (padding up to BLOCK_M) read row M - 1 again; their results are never stored
            word = _load_x(x_ptr + tl.minimum(m, M - 1) * stride_xw + k0 + xcol, ASM)  # (NC, C) int32
            if X_BF16:
                x_even = (word << 16).to(tl.float32, bitcast=True)
                x_odd = (word & -65536).to(tl.float32, bitcast=True)  # -65536 = 0xFFFF0000
            else:
                x_even = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_odd = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            part = tl.sum(hi * x_even[None, :, :] + lo * x_odd[None, :, :], axis=2) * absmax  # (BLOCK_N, NC)
            if BLOCK_M == 1:
                acc += part[:, :, None]
            else:
                acc += tl.where(cols[None, None, :] == m, part[:, :, None], 0.0)

    out = tl.sum(acc, axis=1)  # (BLOCK_N, BLOCK_M)
    if LORA:  # the adapter's term, in float32 with the base product: one rounding at the store
        rr = tl.arange(0, R_PAD)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            h = tl.load(h_ptr + tl.minimum(m, M - 1) * stride_hm + rr, mask=rr < R, other=0.0).to(tl.float32)
            delta = tl.sum(b * h[None, :], axis=1) * scaling  # (BLOCK_N,)
            if BLOCK_M == 1:
                out += delta[:, None]
            else:
                out += tl.where(cols[None, :] == m, delta[:, None], 0.0)
    rn_out = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(
        y_ptr + cols[None, :] * stride_ym + rn_out[:, None],
        out.to(y_ptr.dtype.element_ty),
        mask=(rn_out[:, None] < N) & (cols[None, :] < M),
    )


@triton.jit
def _lora_down_kernel(
    x_ptr,  # (M, K) 16-bit, row stride stride_xm
    a_ptr,  # (R, K) lora_A weight, contiguous
    h_ptr,  # (M, R) in x's dtype: x @ A.T, contiguous
    M,
    stride_xm,
    K: tl.constexpr,  # a model's width: few values, each compiled once
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)  # one row of A: one column of h
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + row * K + rk, mask=rk < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
        xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                     other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)  # fmt: skip
        acc += tl.sum(xs * a[None, :], axis=1)
    tl.store(h_ptr + rm * R + row, acc.to(h_ptr.dtype.element_ty), mask=rm < M)


def lora_down(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """h = x @ A.T (M, r) for a few rows of x (decode): float32 sums, rounded once to x's dtype, as cuBLAS."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    lora_a = lora_a.contiguous()
    m, r = x2.shape[0], lora_a.shape[0]
    h = torch.empty((m, r), dtype=x.dtype, device=x.device)
    with launch_device(x):
        _lora_down_kernel[(r,)](x2, lora_a, h, m, x2.stride(0), K=k, R=r, BLOCK_M=max(2, triton.next_power_of_2(m)),
                                BLOCK_K=1024, num_warps=4)  # fmt: skip
    return h


def gemv_supported(x: torch.Tensor, state: QuantState) -> bool:
    """2-D weight whose rows hold whole quantization blocks, 16-bit x, M <= GEMV_MAX_M, 32-bit offsets."""
    if len(state.shape) != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    n, k = state.shape
    m = x.numel() // max(1, x.shape[-1])
    return 1 <= m <= GEMV_MAX_M and k % state.blocksize == 0 and k % 2 == 0 and state.numel < 2**31


def x_words(x: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x (..., K) of 16-bit values as (M, K/2) int32 words, word j = (x[2j], x[2j+1]): the kernels' view of x."""
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the 4-bit weight expects {k} (shape {list(state.shape)})")
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    return x2.view(torch.int32) if x2.is_contiguous() else x2.contiguous().view(torch.int32)


def default_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tiles by shape, from the sweep of benchmarks/gpu/bench_decode.py on the H200 (NOTES.md, gemv v1).

    8 rows per program of 4 warps won at M = 1 and M = 16 on all three Llama-8B shapes, except that
    gate_proj (N = 14336, 1792 programs) preferred 256-byte steps and the N = 4096 shapes 512-byte steps.
    """
    block_m = 1 if m == 1 else triton.next_power_of_2(m)
    half_k = k // 2
    block_kb = 512 if (m == 1 and n <= 8192) else 256
    while block_kb > 64 and half_k % block_kb:
        block_kb //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": 8, "BLOCK_KB": block_kb, "num_warps": 4}


def lora_arguments(lora: tuple[torch.Tensor, torch.Tensor, float] | None, y: torch.Tensor) -> tuple:
    """The epilogue's (h (M, r), B (N, r), scaling, r) for an (M, N) output y, kernel-ready; without an adapter,
    y as unused pointers."""
    if lora is None:
        return y, y, 0.0, 1
    h, lora_b, scaling = lora
    (m, n), r = y.shape, lora_b.shape[1]
    h = h.reshape(m, r)
    if h.stride(-1) != 1:
        h = h.contiguous()
    lora_b = lora_b.contiguous()
    assert lora_b.shape == (n, r), (tuple(lora_b.shape), n, r)
    return h, lora_b, scaling, r


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    config: dict[str, int] | None = None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x (..., K) @ W.T for at most GEMV_MAX_M rows of x, reading the packed weight once.

    lora: (h, B, scaling) with h = x @ A.T (..., r) and B (N, r): adds scaling * h @ B.T in the epilogue.
    """
    n, k = state.shape
    assert gemv_supported(x, state), "gemv_4bit called on an unsupported shape or dtype"
    words = x_words(x, state)
    m = words.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h, lora_b, scaling, r = lora_arguments(lora, y)
    cfg = dict(config or default_config(m, n, k))
    half_k, half_bs = k // 2, state.blocksize // 2
    chunk = min(32, half_bs)
    block_kb = cfg["BLOCK_KB"]
    while block_kb > chunk and half_k % block_kb:
        block_kb //= 2
    block_kb = max(block_kb, chunk)
    assert half_k % block_kb == 0 and block_kb % chunk == 0, (half_k, block_kb, chunk)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    with launch_device(x):
        _gemv_4bit_kernel[grid](
            words,
            *_weight_pointers(packed, state, x.device),
            y,
            h,
            lora_b,
            float(scaling),
            m,
            n,
            words.stride(0),
            y.stride(0),
            h.stride(0),
            HALF_K=half_k,
            HALF_BS=half_bs,
            C=chunk,
            NESTED=state.state2 is not None,
            NESTED_BS=state.state2.blocksize if state.state2 is not None else 256,
            X_BF16=x.dtype == torch.bfloat16,
            BLOCK_M=max(cfg["BLOCK_M"], 1 if m == 1 else triton.next_power_of_2(m)),
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_KB=block_kb,
            ASM=not triton_interpreted(),  # the CPU interpreter cannot run inline PTX: a tl.load lookup instead
            LORA=lora is not None,
            R=r,
            R_PAD=triton.next_power_of_2(r),
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 1),
        )
    return y.reshape(*x.shape[:-1], n)
