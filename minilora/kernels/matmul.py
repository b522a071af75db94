"""The 4-bit linear on CUDA: y = x @ W.T with W an NF4/FP4 (optionally double-quantized) packed weight, and
its backward, for a frozen 4-bit base layer (QLoRA section 3).

How the forward is computed (benchmarks/gpu/NOTES.md has the figures that set the defaults):

* decode, M <= DECODE_MAX_M: the GEMV kernel of gemv.py (reads the packed weight once);
* a few rows, M <= SMALL_M_MAX (64): the small-M kernel of smallm.py (the packed tile decoded in registers into
  tensor-core products; reads the packed weight once);
* otherwise: the fast dequantize kernel (dequant.py) into a temporary weight in the compute dtype, then
  cuBLAS `F.linear`. (A fused dequantize-matmul Triton kernel measured 12-17x slower on the H200 and was
  removed; NOTES.md keeps its figures.)

The backward computes only grad_input = grad_out @ W (the base weight is frozen): the fast dequantize
kernel rebuilds W in the compute dtype, cuBLAS multiplies, and the temporary is dropped.

`linear_4bit` wraps the forward and its backward as torch.library custom operators (fake and autograd
registered) so that torch.compile traces through them. `lora_linear_4bit` is decode's LoRALinear in two
launches (inference only): h = x @ A.T (gemv.lora_down), then the GEMV with scaling * h @ B.T in its epilogue.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..quant.state import QuantState
from .dequant import dequantize_4bit_triton
from .gemv import gemv_4bit, gemv_supported, lora_down
from .gemv_mma import gemv_4bit_mma, mma_supported, prepared
from .platform import record, triton_interpreted
from .smallm import matmul_4bit_small_m, small_m_supported

# Largest M that takes the GEMV decode kernel (gemv.py); above it, dequantize + cuBLAS.
# The crossover measured on the H200 lies between M = 4 and 8 on all three Llama-8B shapes
# (benchmarks/gpu/NOTES.md, gemv section). 0 = never.
DECODE_MAX_M = 4


def uses_gemv(x: torch.Tensor, state: QuantState) -> bool:
    """Whether matmul_4bit takes the GEMV kernel: at most DECODE_MAX_M rows of x, a shape the kernel takes."""
    return x.numel() // max(1, x.shape[-1]) <= DECODE_MAX_M and gemv_supported(x, state)


def path_of(x: torch.Tensor, state: QuantState) -> str:
    """The kernel matmul_4bit runs: "triton-gemv" (M <= DECODE_MAX_M), "triton-small-m" (up to SMALL_M_MAX rows:
    on an H100 1.2-1.9x bitsandbytes and 1.1-1.9x dequantize + cuBLAS at M = 8..64), else "triton"."""
    if uses_gemv(x, state):
        return "triton-gemv"
    return "triton-small-m" if small_m_supported(x, state) else "triton"


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x @ W.T on the GPU: the GEMV kernel, the small-M kernel, or the dequantize kernel and cuBLAS (path_of)."""
    path = record("linear_4bit", path_of(x, state))
    if path == "triton-gemv":
        return gemv(x, packed, state)
    if path == "triton-small-m":
        return matmul_4bit_small_m(x, packed, state)
    return F.linear(x, dequantize_4bit_triton(packed, state, x.dtype))


def gemv(x: torch.Tensor, packed: torch.Tensor, state: QuantState, lora: tuple | None = None) -> torch.Tensor:
    """The decode GEMV: gemv.py's kernel; with MINILORA_GEMV_MMA=1, gemv_mma.py's tensor-core kernel where the
    shape allows and its weight layout exists or can be built (not inside a CUDA graph capture).
    `last_implementation("gemv_4bit")` says which ran: "mma" or "fma".

    The mma kernel is opt-in: on an H100 (2026-12-08) it was right at the warp counts used here and wrong at one
    warp (now refused), 1.2x faster than gemv.py's at M=1 on 14336x4096 and slower on 4096x4096; the corrected
    GPU test and a whole-token decode with it have not run yet (benchmarks/gpu/NOTES.md, v3)."""
    use_mma = os.environ.get("MINILORA_GEMV_MMA", "0") == "1" and mma_supported(x, state) and not triton_interpreted()
    prep = prepared(packed, state) if use_mma else None
    if prep is not None:
        record("gemv_4bit", "mma")
        return gemv_4bit_mma(x, packed, state, lora=lora, prep=prep)
    record("gemv_4bit", "fma")
    return gemv_4bit(x, packed, state, lora=lora)


# ---- torch.library custom ops: what torch.compile sees ---------------------------------------------
# The 4-bit linear is registered as an operator with a fake (shape-only) implementation and an autograd
# formula, so Dynamo traces a model through it without a graph break: the Triton launch happens inside
# the operator, opaque to the compiler. A QuantState is not a tensor: each operator spells out _state_from's
# arguments, its tensors and integers (torch.library wants each typed). Off CUDA they run the reference.


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


def _op_args(state: QuantState) -> tuple:
    """A QuantState as the operators take it: absmax, code, nested absmax and code, offset, n, k, blocksizes."""
    n, k = state.shape
    s2 = state.state2
    nested = (None, None, 256) if s2 is None else (s2.absmax, s2.code, s2.blocksize)
    return state.absmax, state.code, nested[0], nested[1], state.offset, n, k, state.blocksize, nested[2]


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """y = x @ W.T for a frozen 4-bit W, differentiable in x: the fast twin of Linear4bit's reference matmul.

    One `torch.ops.minilora.matmul_4bit` call: traceable by torch.compile (fake + autograd registered).
    """
    return _matmul_op(x, packed, *_op_args(state))


# ---- decode with an unmerged LoRA adapter (inference only: no autograd formula) ---------------------


# Its arguments are matmul_4bit's (torch.library wants each spelled out), then lora_A, lora_B and scaling.
@torch.library.custom_op("minilora::lora_matmul_4bit", mutates_args=())
def _lora_matmul_op(
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
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    state = _state_from(absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize)
    if x.is_cuda and uses_gemv(x, state):
        record("lora_linear_4bit", "triton-gemv-lora")
        return gemv(x, packed, state, lora=(lora_down(x, lora_a), lora_b, scaling))
    y = _matmul_op(x, packed, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, nested_blocksize)
    return y + (F.linear(F.linear(x, lora_a), lora_b) * scaling).to(y.dtype)


@_lora_matmul_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_code, offset, n, k, *rest):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], n))


def lora_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """W x + scaling * B A x for a 4-bit W at decode: A x by lora_down, the rest in the GEMV's epilogue."""
    return _lora_matmul_op(x, packed, *_op_args(state), lora_a, lora_b, float(scaling))
