"""Triton kernel: the 4-bit GEMV for decode (M = 1..8 rows of x) with the nibbles decoded by byte permutes in
registers and the products on tensor cores.

Why: gemv.py's kernel spends ~8 instructions per weight element (a byte extract, two nibble masks, two 64-bit
table addresses and two L1 gathers per byte, the x unpack, the FMAs and the sums): it is bound by issuing them,
at 27-35% of the read floor on an H100 (benchmarks/gpu/NOTES.md). Here a weight costs ~4.8 (SASS counted by
benchmarks/gpu/sass_loop.py; gemv.py: 8.1):

* the code table lives in registers as byte planes. Each 16-bit code (the table rounded to x's dtype) is a high
  byte H and a low byte L; TH0..TH3 hold H of codes 0-3, 4-7, 8-11, 12-15, TL0..TL3 the low bytes. PTX `prmt`
  picks 4 bytes out of 8 by four 4-bit selectors, so for four nibbles g (16 bits):
      ha = prmt(TH0, TH1, g & 0x7777)     H of codes 0-7      hb = prmt(TH2, TH3, g & 0x7777)   codes 8-15
      h  = prmt(ha, hb, 0x3210 | ((g >> 1) & 0x4444))        each byte from ha or hb by the nibble's bit 3
  and the same for L; two more permutes interleave L and H into two bf16x2 (fp16x2) registers: 21
  instructions for 8 elements;
* those registers are exactly the A operand of `mma.sync.m16n8k16` (16 weight rows x 16 k), x is its B
  operand (8 columns: the rows of x, M <= 8; at M = 1 seven columns repeat row 0), float32 accumulators: the
  products and their sums cost one instruction per 256 elements;
* the packed bytes are stored in the operand's order (a layout built once per weight, `mma_layout`, exact and
  invertible: the checkpoint keeps bitsandbytes' layout): a warp's 16 bytes per thread per 64-k step are the
  fragments of four consecutive mma, one 128-bit load, and a program's W warps read W x 512 contiguous bytes;
* one quantization block of 64 k is one step: the four mma start from zero and their sums are scaled once by
  the row's absmax (double quant: code8[q] * nested_absmax + offset, the reference's float32 arithmetic).

Numerics: sum_k code16[q_k] x_k in float32 (tensor cores), times absmax in float32, one rounding at the end.
code16 is the table rounded to x's dtype: the reference rounds code * absmax to it instead; both are one
rounding per weight (~2e-3 relative in bf16, tests/kernels/test_gpu.py bounds it).

Fragment layout (PTX ISA, mma.m16n8k16 with 16-bit A/B): lane L = 4q + t holds A rows q and q + 8 at k pairs
(2t, 2t+1) and (2t+8, 2t+9), B (k pairs 2t and 2t+8, column q), and D rows q, q+8 at columns 2t, 2t+1. The
kernel's tensors are (W x 32, 4): thread, register: the layout Triton gives a (W x 32, 4) tensor over W
warps (checked from its TTGIR when the kernel was written; the GPU tests would fail otherwise).

Status: opt-in (MINILORA_GEMV_MMA=1, kernels/matmul.py `gemv`): written and checked without a GPU (the session's
device loans were paused); the GPU tests (tests/kernels/test_gpu.py, "mma") and benchmarks/gpu/bench_gemv_mma.py
are what decide whether it becomes the default.

Triton's CPU interpreter cannot run PTX: with ASM off the kernel computes the same step sum directly from the
reordered bytes and x (the layout, the indexing, the absmax and the epilogue are what it checks there).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ..quant.state import QuantState
from .dequant import _weight_pointers
from .gemv import lora_arguments, x_words
from .platform import launch_device, triton_interpreted

MMA_MAX_M = 8  # the mma's N: the rows of x one pass serves
STEP = 64  # k per step: four mma of 16, one quantization block of 64
STEP_K = tl.constexpr(STEP)  # the same, for the kernels
# The permute selectors (tests/kernels/test_gemv_mma.py emulates them on the CPU with the table of `plane_words`).
SEL_PAIR = (0x4051, 0x6273)  # (L, H) planes -> bf16x2 of the low byte's nibbles, of the high byte's


def _asm(f16: bool) -> str:
    """The PTX of one step: 4 packed words ($4-$7), x ($8-$15), tables TH ($16-$19), TL ($20-$23) -> D ($0-$3)."""
    ty = "f16" if f16 else "bf16"
    out = ["{", ".reg .b32 g0, g1, s0, s1, ha, hb, la, lb, h, l, a0, a1, a2, a3;", ".reg .f32 d0, d1, d2, d3;"]
    out += [f"mov.b32 d{i}, 0f00000000;" for i in range(4)]
    xregs = ["$8", "$9", "$10", "$11", "$12", "$13", "$14", "$15"]
    for j in range(4):
        p = f"${4 + j}"
        out += [
            f"and.b32 g0, {p}, 0x77777777;",
            f"shr.u32 s0, {p}, 1;",
            "and.b32 s0, s0, 0x44444444;",
            "or.b32 s0, s0, 0x32103210;",
            "shr.u32 g1, g0, 16;",
            "shr.u32 s1, s0, 16;",
        ]
        for half in range(2):
            g, s = f"g{half}", f"s{half}"
            out += [
                f"prmt.b32 ha, $16, $17, {g};",
                f"prmt.b32 hb, $18, $19, {g};",
                f"prmt.b32 h, ha, hb, {s};",
                f"prmt.b32 la, $20, $21, {g};",
                f"prmt.b32 lb, $22, $23, {g};",
                f"prmt.b32 l, la, lb, {s};",
                f"prmt.b32 a{2 * half}, l, h, {SEL_PAIR[0]:#x};",
                f"prmt.b32 a{2 * half + 1}, l, h, {SEL_PAIR[1]:#x};",
            ]
        b0, b1 = xregs[2 * j], xregs[2 * j + 1]
        out.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, "
            f"{{{b0}, {b1}}}, {{d0, d1, d2, d3}};"
        )
    out += [f"mov.b32 ${i}, d{i};" for i in range(4)] + ["}"]
    return "\n".join(out)


_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 20))  # D; words, x, x, TH, TL: 4 registers each
_ASM_BF16, _ASM_F16 = tl.constexpr(_asm(False)), tl.constexpr(_asm(True))


@triton.jit
def _gemv_mma_kernel(
    w_ptr,  # int32 (N/16, S, 32, 4): mma_layout's words
    x_ptr,  # int32 (M, K/2): x's words (two 16-bit inputs each), row stride stride_xw
    absmax_ptr,  # float32 (n_blocks,), or uint8 codes with NESTED
    code16_ptr,  # float32 (16,): the code table rounded to x's dtype (the interpreter's path)
    nested_absmax_ptr,
    code8_ptr,
    offset_ptr,
    y_ptr,  # (M, N) in x's dtype, row stride stride_ym
    h_ptr,  # (M, R) x @ A.T  (LORA only)
    b_ptr,  # (N, R) lora_B   (LORA only)
    scaling,
    th0,
    th1,
    th2,
    th3,
    tl0,
    tl1,
    tl2,
    tl3,  # int32: the table's byte planes (plane_words)  # fmt: skip
    M,
    stride_xw,
    stride_ym,
    stride_hm,
    K: tl.constexpr,
    BS: tl.constexpr,  # quantization blocksize, a multiple of 64
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    F16: tl.constexpr,  # x is float16 (else bfloat16)
    W: tl.constexpr,  # warps: each takes every W-th step of K
    ASM: tl.constexpr,
    LORA: tl.constexpr,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
):
    S: tl.constexpr = K // STEP_K  # steps per row
    g = tl.program_id(0)  # 16 weight rows
    i = tl.arange(0, W * 32)[:, None]  # (T, 1) thread: warp i // 32, lane i % 32
    reg = tl.arange(0, 4)[None, :]  # (1, 4) its registers
    wi = i // 32
    q = (i % 32) // 4
    t = i % 4
    row = g * 16 + q + 8 * (reg // 2)  # (T, 4) weight row of D's register
    w_off = g * (S * 128) + i * 4 + reg  # (T, 4): the program's W x 512 contiguous bytes of one iteration
    x_row = tl.minimum(q, M - 1)  # B's column q is x's row q
    # B's registers for the step's 4 mma: words t, t+4, ..., t+28 of the step (k pairs 2t and 2t+8 of each 16)
    x_off = x_row * stride_xw + wi * 32 + t + 4 * reg  # (T, 4); +16 for the thread's other 4 words
    th = tl.where(reg == 0, th0, tl.where(reg == 1, th1, tl.where(reg == 2, th2, th3)))  # the PTX's tables
    tlo = tl.where(reg == 0, tl0, tl.where(reg == 1, tl1, tl.where(reg == 2, tl2, tl3)))
    th = tl.broadcast_to(th, (W * 32, 4))
    tlo = tl.broadcast_to(tlo, (W * 32, 4))
    acc = tl.zeros((W * 32, 4), dtype=tl.float32)
    n_it: tl.constexpr = S // W
    # Two steps per trip, each step's loads issued before the other's work: no registers rotate between trips.
    wa, xaa, xba = _load_step(w_ptr, x_ptr, w_off, x_off, 0, W)
    for it in range(0, n_it - 1, 2):
        wb, xab, xbb = _load_step(w_ptr, x_ptr, w_off, x_off, it + 1, W)
        acc += _step(wa, xaa, xba, th, tlo, it, wi, W, w_ptr, x_ptr, code16_ptr, absmax_ptr, nested_absmax_ptr,
                     code8_ptr, offset_ptr, g, row, t, reg, M, stride_xw,
                     S, K, BS, NESTED, NESTED_BS, F16, ASM)  # fmt: skip
        if it + 2 < n_it:
            wa, xaa, xba = _load_step(w_ptr, x_ptr, w_off, x_off, it + 2, W)
        acc += _step(wb, xab, xbb, th, tlo, it + 1, wi, W, w_ptr, x_ptr, code16_ptr, absmax_ptr, nested_absmax_ptr,
                     code8_ptr, offset_ptr, g, row, t, reg, M, stride_xw,
                     S, K, BS, NESTED, NESTED_BS, F16, ASM)  # fmt: skip
    if n_it % 2:  # an odd count: the last step, loaded by the last trip (or before the loop)
        acc += _step(wa, xaa, xba, th, tlo, n_it - 1, wi, W, w_ptr, x_ptr, code16_ptr, absmax_ptr, nested_absmax_ptr,
                     code8_ptr, offset_ptr, g, row, t, reg, M, stride_xw,
                     S, K, BS, NESTED, NESTED_BS, F16, ASM)  # fmt: skip

    acc = tl.reshape(acc, (W, 32, 4))
    out = tl.sum(acc, axis=0)  # (32, 4): the warps' parts of K
    lane2 = tl.arange(0, 32)[:, None]
    reg2 = tl.arange(0, 4)[None, :]
    rows = g * 16 + lane2 // 4 + 8 * (reg2 // 2)  # (32, 4)
    ms = 2 * (lane2 % 4) + reg2 % 2  # D's column: x's row
    if LORA:
        rr = tl.arange(0, R_PAD)[None, None, :]
        ok = rr < R
        b = tl.load(b_ptr + rows[:, :, None] * R + rr, mask=ok, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + tl.minimum(ms, M - 1)[:, :, None] * stride_hm + rr, mask=ok, other=0.0).to(tl.float32)
        out += tl.sum(b * h, axis=2) * scaling
    tl.store(y_ptr + ms * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=ms < M)


@triton.jit
def _load_step(w_ptr, x_ptr, w_off, x_off, it, W: tl.constexpr):
    """Trip it's loads: the thread's 4 packed words and its 8 x words (B's registers for the step's 4 mma)."""
    return (tl.load(w_ptr + w_off + it * (W * 128)), tl.load(x_ptr + x_off + it * (W * 32)),
            tl.load(x_ptr + x_off + it * (W * 32) + 16))  # fmt: skip


@triton.jit
def _step(words, xa, xb, th, tlo, it, wi, W: tl.constexpr, w_ptr, x_ptr, code16_ptr, absmax_ptr, nested_absmax_ptr,
          code8_ptr, offset_ptr, g, row, t, reg, M, stride_xw, S: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
          NESTED: tl.constexpr, NESTED_BS: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Step it * W + wi of the thread's 4 registers: the block sums (the PTX, or its plain twin) times the absmax."""
    step = it * W + wi  # (T, 1)
    if ASM:
        d = tl.inline_asm_elementwise(
            _ASM_F16 if F16 else _ASM_BF16,
            _CONSTRAINTS,
            [words, xa, xb, th, tlo],
            dtype=tl.float32,
            is_pure=True,
            pack=4,
        )
    else:
        d = _step_sum(w_ptr, x_ptr, code16_ptr, g, step, row, t, reg, M, stride_xw, S, F16)
    blk = row * (K // BS) + (step * STEP_K) // BS  # (T, 4)
    if NESTED:
        qa = tl.load(absmax_ptr + blk).to(tl.int32)
        absmax = tl.load(code8_ptr + qa) * tl.load(nested_absmax_ptr + blk // NESTED_BS) + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk)
    return d * absmax


@triton.jit
def _step_sum(w_ptr, x_ptr, code16_ptr, g, step, row, t, reg, M, stride_xw, S: tl.constexpr, F16: tl.constexpr):
    """What the PTX step computes, in plain Triton (the interpreter's path): D[row][column] = sum over the step's
    64 k of code16[nibble] * x[column][k], read from the same reordered bytes."""
    c = tl.arange(0, 32)[None, None, :]  # (1, 1, 32) byte of the row in this step: k pair c
    row4 = row[:, :, None]
    rg, hh, qq = row4 // 16, (row4 % 16) // 8, row4 % 8
    j, u, tt = c // 8, (c % 8) // 4, c % 4
    byte = (((rg * S + step[:, :, None]) * 32 + qq * 4 + tt) * 4 + j) * 4 + u * 2 + hh
    packed = tl.load(w_ptr.to(tl.pointer_type(tl.uint8), bitcast=True) + byte).to(tl.int32)
    hi = tl.load(code16_ptr + (packed >> 4))  # element 2c
    lo = tl.load(code16_ptr + (packed & 15))  # element 2c + 1
    col = 2 * t[:, :, None] + reg[:, :, None] % 2  # D's column = x's row
    word = tl.load(x_ptr + tl.minimum(col, M - 1) * stride_xw + step[:, :, None] * 32 + c)
    if F16:
        x_even = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        x_odd = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x_even = (word << 16).to(tl.float32, bitcast=True)
        x_odd = (word & -65536).to(tl.float32, bitcast=True)
    return tl.sum(hi * x_even + lo * x_odd, axis=2)


# ---- host side ------------------------------------------------------------------------------------------


def mma_supported(x: torch.Tensor, state: QuantState) -> bool:
    """16-bit x with at most MMA_MAX_M rows; N a multiple of 16; K and the blocksize multiples of 64."""
    if len(state.shape) != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    n, k = state.shape
    m = x.numel() // max(1, x.shape[-1])
    return (1 <= m <= MMA_MAX_M and n % 16 == 0 and k % (2 * STEP) == 0 and state.blocksize % STEP == 0
            and k % state.blocksize == 0 and state.numel < 2**31)  # fmt: skip


def mma_layout_of(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' packed bytes (N, K/2) -> the mma operand order, int32 (N/16, K/64, 32, 4).

    Weight row 16g + 8h + q, byte column 32s + 8j + 4u + t (two k each) goes to group g, step s, lane 4q + t,
    word j, byte 2u + h: the A fragment of mma j of step s for that lane (rows q, q+8; k pairs t, t+4)."""
    b = packed.reshape(n // 16, 2, 8, k // STEP, 4, 2, 4)  # g, h, q, s, j, u, t
    return b.permute(0, 3, 2, 6, 4, 5, 1).reshape(-1).view(torch.int32).reshape(n // 16, k // STEP, 32, 4)


def packed_of_mma_layout(words: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of mma_layout_of: back to bitsandbytes' (N * K/2,) bytes."""
    b = words.reshape(-1).view(torch.uint8).reshape(n // 16, k // STEP, 8, 4, 4, 2, 2)  # g, s, q, t, j, u, h
    return b.permute(0, 6, 2, 1, 4, 5, 3).contiguous().reshape(-1)


def plane_words(code: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
    """The 16-entry table rounded to `dtype`, as the kernel's 8 byte-plane words (TH0..TH3, TL0..TL3)."""
    bits = code.detach().to("cpu", torch.float32).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    hi, lo = (bits >> 8).tolist(), (bits & 0xFF).tolist()

    def word(plane: list[int], i: int) -> int:
        v = plane[4 * i] | plane[4 * i + 1] << 8 | plane[4 * i + 2] << 16 | plane[4 * i + 3] << 24
        return v - (1 << 32) if v >= 1 << 31 else v  # as a signed int32 argument

    return tuple(word(hi, i) for i in range(4)) + tuple(word(lo, i) for i in range(4))


# One reordered copy per weight, built outside any CUDA graph capture (the decoder's warm-up): keyed by the
# packed tensor's address, valid while that tensor lives (a weak reference: a freed address is never reused)
# and is not written in place (its version counter).
_layouts: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor, dict, int]] = {}


def prepared(packed: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, dict] | None:
    """The weight's mma layout and table words, built on first use; None while a CUDA graph is being captured
    and the layout does not exist yet (the caller then runs gemv.py's kernel)."""
    key = (packed.data_ptr(), packed.device.index or 0)
    hit = _layouts.get(key)
    # the same live tensor, unchanged since (an in-place write, e.g. load_state_dict, bumps its version)
    if hit is not None and hit[0]() is not None and hit[3] == packed._version and hit[1].numel() * 8 == state.numel:
        return hit[1], hit[2]
    if packed.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    for stale in [k for k, v in _layouts.items() if v[0]() is None]:
        del _layouts[stale]
    n, k = state.shape
    words = mma_layout_of(packed, n, k)
    # per x dtype: the PTX's 8 plane words, and the rounded table as float32 for the interpreter's twin
    tables = {
        dt: (plane_words(state.code, dt), state.code.to(packed.device, torch.float32).to(dt).float())
        for dt in (torch.bfloat16, torch.float16)
    }
    _layouts[key] = (weakref.ref(packed), words, tables, packed._version)
    return words, tables


# One warp is wrong on the GPU (H100, 2026-12-08: relative error ~2): Triton lays a (32, 4) tensor out as
# sizePerThread [4, 1] over threadsPerWarp [8, 4], so a thread's 4 registers are not one row's 4 fragment words
# the PTX assumes. From 2 warps it is [1, 1] over [32, 1] x [W, 1], each thread one row's 4 words (checked from
# the TTGIR on the CPU: tests/kernels/test_gemv_mma.py); 4 and 16 warps gave the right product on the H100.
MIN_WARPS = 2


def warps_for(n: int, k: int) -> int:
    """Warps per program (each takes every W-th 64-k step, so W divides K/64): at least 2 (MIN_WARPS), 4 where K
    allows, more (up to 16) until the grid holds ~3.5K warps, enough to keep the card's reads in flight."""
    w = MIN_WARPS
    while w < 16 and (k // STEP) % (2 * w) == 0 and (w < 4 or (n // 16) * w < 3584):
        w *= 2
    return w


def gemv_4bit_mma(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    prep: tuple[torch.Tensor, dict] | None = None,  # prepared()'s result
    warps: int | None = None,
) -> torch.Tensor:
    """x (..., K) @ W.T for at most MMA_MAX_M rows of x; lora as gemv.gemv_4bit's: (h = x @ A.T, B, scaling)."""
    n, k = state.shape
    assert mma_supported(x, state), "gemv_4bit_mma called on an unsupported shape or dtype"
    words, tables = prep or prepared(packed, state)  # type: ignore[misc]
    xw = x_words(x, state)  # (M, K/2) int32
    m = xw.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h, lora_b, scaling, r = lora_arguments(lora, y)
    _, absmax, _, nested, code8, offset = _weight_pointers(packed, state, x.device)
    w = warps or warps_for(n, k)
    if w < MIN_WARPS or (k // STEP) % w:
        raise ValueError(f"gemv_4bit_mma: {w} warps; at least {MIN_WARPS}, dividing the {k // STEP} steps of K")
    f16 = x.dtype == torch.float16
    planes, code16 = tables[x.dtype]
    with launch_device(x):
        _gemv_mma_kernel[(n // 16,)](
            words, xw, absmax, code16, nested, code8, offset, y, h, lora_b, float(scaling), *planes,
            m, xw.stride(0), y.stride(0), h.stride(0),
            K=k, BS=state.blocksize, NESTED=state.state2 is not None,
            NESTED_BS=state.state2.blocksize if state.state2 is not None else 256,
            F16=f16, W=w, ASM=not triton_interpreted(), LORA=lora is not None, R=r,
            R_PAD=triton.next_power_of_2(r), num_warps=w, num_stages=1,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
