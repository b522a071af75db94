"""Triton kernels: y = x @ W.T with W an NF4/FP4 (optionally double-quantized) packed weight, and the
autograd function that uses them for a frozen 4-bit base layer (QLoRA section 3).

How the forward is computed (benchmarks/gpu/NOTES.md has the figures that set the defaults):

* decode, M <= DECODE_MAX_M: the GEMV kernel of gemv.py (reads the packed weight once).
* otherwise: the fast dequantize kernel into a temporary weight in the compute dtype, then cuBLAS
  `F.linear` (TRAIN_STRATEGY = "dequant", the default), or the fused kernel below ("fused", opt-in: it
  measured 12-17x slower on the H200). The fused kernel (`_matmul_4bit_kernel`) dequantizes a weight tile
  in registers and uses it as the MMA's A operand (no float weight in memory).

`linear_4bit` wraps the forward and its backward as torch.library custom operators (fake and autograd
registered) so that torch.compile traces through them.

The dequantized tile equals the reference weight bit for bit (same float32 operations, no FMA fusion,
cast to the compute dtype); the products and sums then run on the tensor cores in float32 accumulation,
in another order than cuBLAS: outputs agree with the reference within bf16/fp16 rounding.

The backward computes only grad_input = grad_out @ W (the base weight is frozen): the fast dequantize
kernel rebuilds W in the compute dtype, cuBLAS multiplies, and the temporary is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..quant.state import QuantState
from .dequant import _state_pointers, dequantize_4bit_triton
from .gemv import gemv_4bit, gemv_supported

# "dequant": fast dequantize to the compute dtype + cuBLAS; "fused": the Triton kernel for every M.
TRAIN_STRATEGY = "dequant"
# Largest M that takes the GEMV decode kernel (gemv.py); above it, dequantize + cuBLAS (or "fused").
# The crossover measured on the H200 lies between M = 4 and 8 on all three Llama-8B shapes
# (benchmarks/gpu/NOTES.md, gemv section). 0 = never.
DECODE_MAX_M = 4
# Inside the fused kernel: up to this M, small decode tiles (BLOCK_M = 16); above, training tiles.
DECODE_TILE_MAX_M = 16
# Autotune the tiles once per (N, K, blocksize) on first use; False takes the fixed defaults below
# (the tests do, to spare compile time).
AUTOTUNE = True
DEFAULT_DECODE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
DEFAULT_TRAIN = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


@triton.jit
def _matmul_4bit_kernel(
    x_ptr,  # (M, K) fp16/bf16, row stride stride_xm, unit column stride
    packed_ptr,  # uint8 (N * K / 2,): row n holds K/2 bytes
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    code8_ptr,
    offset_ptr,
    y_ptr,  # (M, N), row stride stride_ym
    M,
    N,
    stride_xm,
    stride_ym,
    K: tl.constexpr,  # a compile-time constant: one specialization per layer width
    BS: tl.constexpr,  # quantization blocksize; K % BS == 0 and BS % BLOCK_K == 0
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    # 32-bit index arithmetic throughout (the wrapper checks that every offset fits).
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows = output columns
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x
    n_ok = rn < N
    m_ok = rm < M
    half_k = K // 2
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BLOCK_K/2,) byte columns
        packed = tl.load(
            packed_ptr + rn[:, None] * half_k + kb[None, :], mask=n_ok[:, None] & (kb[None, :] < half_k), other=0
        ).to(tl.int32)  # (BLOCK_N, BLOCK_K/2)

        # BLOCK_K divides BS and K % BS == 0: the tile's part of each row lies in one quantization block.
        blk = (rn * K + k0) // BS  # (BLOCK_N,)
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=n_ok, other=0).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=n_ok, other=0.0)
            absmax = tl.load(code8_ptr + q) * scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blk, mask=n_ok, other=0.0)

        # The high nibbles are the even columns of W, the low nibbles the odd ones. Rather than
        # interleaving them, multiply each half with the matching (even or odd) rows of x.T: the sum over
        # k is the same, and no register shuffle is needed.
        w_even = (tl.load(code_ptr + (packed >> 4)) * absmax[:, None]).to(x_ptr.dtype.element_ty)
        w_odd = (tl.load(code_ptr + (packed & 15)) * absmax[:, None]).to(x_ptr.dtype.element_ty)
        k_even = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # (BLOCK_K/2,)
        x_mask = m_ok[None, :] & (k_even[:, None] < K)
        x_even = tl.load(x_ptr + rm[None, :] * stride_xm + k_even[:, None], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rm[None, :] * stride_xm + k_even[:, None] + 1, mask=x_mask, other=0.0)
        acc = tl.dot(w_even, x_even, acc)  # (BLOCK_N, BLOCK_M)
        acc = tl.dot(w_odd, x_odd, acc)
    tl.store(
        y_ptr + rm[None, :] * stride_ym + rn[:, None],
        acc.to(y_ptr.dtype.element_ty),
        mask=n_ok[:, None] & m_ok[None, :],
    )


def _configs(block_m: list[int], block_n: list[int], block_k: list[int], warps: int, stages: list[int]) -> list:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=s)
        for bm in block_m
        for bn in block_n
        for bk in block_k
        for s in stages
    ]


_decode_kernel = triton.autotune(configs=_configs([16], [16, 32, 64], [64], 4, [4, 6]), key=["N", "K", "BS", "NESTED"])(
    _matmul_4bit_kernel
)
_train_kernel = triton.autotune(
    configs=_configs([128], [128], [64], 8, [3, 4]) + _configs([128, 256], [64], [64], 4, [3]),
    key=["N", "K", "BS", "NESTED"],
)(_matmul_4bit_kernel)
# Single-config kernels for tests and the TRITON_INTERPRET checks (no autotuning).
_plain_kernel = _matmul_4bit_kernel


def fused_supported(x: torch.Tensor, state: QuantState) -> bool:
    """The fused kernel needs whole quantization blocks of >= 64 per weight row and a 16-bit compute dtype."""
    k = state.shape[-1]
    m = x.numel() // max(1, x.shape[-1])
    return (
        x.dtype in (torch.float16, torch.bfloat16)
        and len(state.shape) == 2
        and max(state.numel, m * state.shape[0], m * state.shape[1]) < 2**31
        and k % state.blocksize == 0
        and state.blocksize % 64 == 0
    )


def matmul_4bit_fused(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, config: dict[str, int] | None = None
) -> torch.Tensor:
    """x (..., K) @ W.T in one Triton kernel; W is never materialized. `config` fixes the tiles (no autotune)."""
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the 4-bit weight expects {k} (shape {list(state.shape)})")
    assert fused_supported(x, state), "fused 4-bit matmul called on an unsupported shape or dtype"
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    absmax, code, nested, code8, offset = _state_pointers(state, x.device)
    args = (x2, packed.reshape(-1), absmax, code, nested, code8, offset, y, m, n, x2.stride(0), y.stride(0))
    meta = {
        "K": k,
        "BS": state.blocksize,
        "NESTED": state.state2 is not None,
        "NESTED_BS": state.state2.blocksize if state.state2 is not None else 256,
    }
    if config is None and not AUTOTUNE:
        config = DEFAULT_DECODE if m <= DECODE_TILE_MAX_M else DEFAULT_TRAIN
    if config is not None:
        grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
        extra = {key: v for key, v in config.items() if key in ("num_warps", "num_stages")}
        tiles = {key: v for key, v in config.items() if key.startswith("BLOCK_")}
        _plain_kernel[grid](*args, **meta, **tiles, **extra, enable_fp_fusion=False)
    else:
        kernel = _decode_kernel if m <= DECODE_TILE_MAX_M else _train_kernel

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))

        kernel[grid](*args, **meta, enable_fp_fusion=False)
    return y.reshape(*x.shape[:-1], n)


def uses_gemv(x: torch.Tensor, state: QuantState) -> bool:
    """Whether matmul_4bit takes the GEMV kernel: at most DECODE_MAX_M rows of x, a shape the kernel takes."""
    return x.numel() // max(1, x.shape[-1]) <= DECODE_MAX_M and gemv_supported(x, state)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, strategy: str | None = None) -> torch.Tensor:
    """x @ W.T on the GPU: the GEMV kernel for M <= DECODE_MAX_M, else `strategy` ("dequant" or "fused")."""
    strategy = strategy or TRAIN_STRATEGY
    if uses_gemv(x, state):
        return gemv_4bit(x, packed, state)
    if strategy == "fused" and fused_supported(x, state):
        return matmul_4bit_fused(x, packed, state)
    return F.linear(x, dequantize_4bit_triton(packed, state, x.dtype))


# ---- torch.library custom ops: what torch.compile sees ---------------------------------------------
# The 4-bit linear is registered as an operator with a fake (shape-only) implementation and an autograd
# formula, so Dynamo traces a model through it without a graph break: the Triton launch happens inside
# the operator, opaque to the compiler. A QuantState is not a tensor: it travels as its tensors plus
# integers. Off CUDA the operators run the plain-PyTorch reference.


def _state_from(
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
) -> QuantState:
    from ..quant.state import NestedState

    state2 = None if nested_absmax is None else NestedState(nested_absmax, nested_code, nested_blocksize)  # type: ignore[arg-type]
    return QuantState(
        absmax=absmax,
        shape=torch.Size((n, k)),
        code=code,
        blocksize=blocksize,
        quant_type="nf4",  # not read by the kernels: the code table is what decodes
        dtype=torch.float32,
        offset=offset,
        state2=state2,
    )


@torch.library.custom_op("minilora::dequantize_4bit", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    state = _state_from(absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize)
    if packed.is_cuda:
        return dequantize_4bit_triton(packed, state, dtype)
    from ..quant.blockwise import dequantize_4bit

    return dequantize_4bit(packed, state, dtype)


@_dequantize_op.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize, dtype):  # type: ignore[no-untyped-def]
    return packed.new_empty((n, k), dtype=dtype)


@torch.library.custom_op("minilora::matmul_4bit", mutates_args=())
def _matmul_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    state = _state_from(absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize)
    if x.is_cuda:
        return matmul_4bit(x, packed, state)
    from ..quant.blockwise import dequantize_4bit

    return F.linear(x, dequantize_4bit(packed, state, x.dtype))


@_matmul_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], n))


def _matmul_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
    ctx.meta = (n, k, blocksize, nested_blocksize)


def _matmul_backward(ctx, grad_out: torch.Tensor) -> tuple:  # type: ignore[no-untyped-def]
    """grad_input = grad_out @ W, W rebuilt by the dequantize kernel (frozen base: no weight gradient)."""
    packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = _dequantize_op(
            packed, absmax, code, nested_absmax, nested_code, offset, *ctx.meta, dtype=grad_out.dtype
        )  # (N, K), dropped on return
        grad_x = grad_out @ weight
    return (grad_x,) + (None,) * 10


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """y = x @ W.T for a frozen 4-bit W, differentiable in x: the fast twin of Linear4bit's reference matmul.

    One `torch.ops.minilora.matmul_4bit` call: traceable by torch.compile (fake + autograd registered).
    """
    n, k = state.shape
    s2 = state.state2
    return _matmul_op(
        x,
        packed,
        state.absmax,
        state.code,
        None if s2 is None else s2.absmax,
        None if s2 is None else s2.code,
        state.offset,
        n,
        k,
        state.blocksize,
        256 if s2 is None else s2.blocksize,
    )
