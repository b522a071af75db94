"""The door: the one place that decides which implementation of a quantized op runs, and remembers it.

Every fast path of this package computes the same function as the plain-PyTorch reference in minilora.quant
(tested so). Callers above (minilora.nn, lora, io, train) call these functions, never a kernel:

    quantize_4bit(x, ...)                  "triton" on an NVIDIA GPU (bitsandbytes' CUDA rule, one launch),
                                           else "reference" (rounding "bnb_cuda" on CUDA, "bnb_cpu" elsewhere)
    dequantize_4bit(packed, state, dtype)  "triton" on CUDA, "compiled-cpu" for large CPU weights, else "reference"
    quantize_int8(w)                       "triton" on an NVIDIA GPU (the reference with the GPU's division)
    linear_4bit(x, packed, state)          "triton-gemv" (M <= 4 on CUDA), "triton-small-m" (M <= 64),
                                           "triton" (dequantize + cuBLAS); on CPU "compiled-cpu-gemv"
                                           (one row, no gradient: the bytes read in a compiled loop),
                                           else the dequantize choice, then F.linear
    lora_linear_4bit(x, packed, state, A, B, s)  decode's W x + s B A x: "triton-gemv-lora" (no grad, M <= 4,
                                           CUDA), else None: the caller runs the reference LoRALinear
    embedding_rows(table, ids)             "triton-host-gather" (CUDA ids, a pinned host table), else "reference"

What decides, in this order: the switch (`MINILORA_REFERENCE=1`, `use_reference()`, `with reference_mode():`
force "reference" everywhere), the tensor's device (CUDA, and NVIDIA rather than ROCm for the kernels with
inline PTX), whether Triton can be imported (and is not its CPU interpreter, `TRITON_INTERPRET=1`), the
dtype, the size (compiled-cpu from compiled.MIN_NUMEL elements; `MINILORA_CPU_COMPILE=0` turns it off), and
not being inside a torch.compile trace. A fast path that fails (a C++ compiler missing or broken) falls back
to the reference.

Which kernel did I get? `implementation(op, *args)` answers before a call, with the same arguments;
`last_implementation(op)` says what the last call of `op` in this process ran, fallbacks included:

    >>> implementation("dequantize_4bit", packed, state, torch.bfloat16)
    'compiled-cpu'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..quant import blockwise, int8
from ..quant.state import FLOAT_DTYPES, QuantState
from . import compiled, workspace
from .platform import _last, record, triton_available, triton_interpreted

REFERENCE = "reference"
_forced: bool | None = None  # set by use_reference(); None means "read the environment"


def use_reference(force: bool = True) -> None:
    """Force the plain-PyTorch reference everywhere (force=True), or let the door choose again (False).

    The call overrides MINILORA_REFERENCE for the rest of the process.
    """
    global _forced
    _forced = bool(force)


def reference_forced() -> bool:
    """True when the reference is forced, by `use_reference(True)` or MINILORA_REFERENCE=1."""
    if _forced is not None:
        return _forced
    return os.environ.get("MINILORA_REFERENCE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def reference_mode(force: bool = True) -> Iterator[None]:
    """`with reference_mode():` runs its body on the reference path, then restores the previous choice."""
    global _forced
    previous = _forced
    _forced = bool(force)
    try:
        yield
    finally:
        _forced = previous


def use_fast_path(x: torch.Tensor) -> bool:
    """True when the Triton kernels should handle tensor `x`: CUDA, Triton importable, the reference not forced."""
    return x.is_cuda and not reference_forced() and triton_available()


def _ptx_kernels(x: torch.Tensor) -> bool:
    """The Triton kernels with inline PTX (fastdiv.py, quantize.py) may run on x: an NVIDIA GPU (ROCm's compiler
    takes no PTX), Triton compiled (not its CPU interpreter)."""
    return use_fast_path(x) and torch.version.hip is None and not triton_interpreted()


def last_implementation(op: str) -> str | None:
    """The implementation the last call of `op` ran in this process (None before the first)."""
    return _last.get(op)


# ---- the choices ---------------------------------------------------------------------------------------


def _dequantize_choice(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> str:
    dtype = dtype or state.dtype
    # inside a torch.compile trace the compiler fuses the reference itself
    if reference_forced() or packed.dtype != torch.uint8 or dtype not in FLOAT_DTYPES or torch.compiler.is_compiling():
        return REFERENCE
    if use_fast_path(packed):
        return "triton"
    cpu_compile = os.environ.get("MINILORA_CPU_COMPILE", "").strip().lower() not in ("0", "false", "no", "off")
    if (
        packed.device.type == "cpu"
        and cpu_compile
        and state.numel >= max(compiled.MIN_NUMEL, state.blocksize)
        and compiled.available()
    ):
        return "compiled-cpu"
    return REFERENCE


def _linear_choice(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> str:
    """linear_4bit's implementation for an uncached weight (see the module's table)."""
    if use_fast_path(x):
        from .matmul import path_of

        return path_of(x, state)
    name = _dequantize_choice(packed, state, x.dtype)
    # one row without a gradient to carry (a decode step): the compiled loop reads the bytes, W is never built
    if name == "compiled-cpu" and not (torch.is_grad_enabled() and x.requires_grad) and compiled.gemv_applies(x, state):
        return "compiled-cpu-gemv"
    return name


def _default_rounding(x: torch.Tensor) -> str:
    """bitsandbytes rounds differently on each device: store the bytes it stores on x's device."""
    return "bnb_cuda" if x.is_cuda else "bnb_cpu"


def implementation(op: str, *args: object, **kwargs: object) -> str:
    """Which implementation `op(*args, **kwargs)` would run now: "reference", "compiled-cpu", "triton" or
    "triton-gemv". op: "quantize_4bit", "dequantize_4bit", "quantize_int8" or "linear_4bit"."""
    if op == "dequantize_4bit":
        return _dequantize_choice(*args, **kwargs)  # type: ignore[arg-type]
    if op == "quantize_4bit":
        x = args[0]
        rounding = kwargs.get("rounding") or (args[4] if len(args) > 4 else None) or _default_rounding(x)
        return "triton" if rounding == "bnb_cuda" and _ptx_kernels(x) else REFERENCE  # type: ignore[arg-type]
    if op == "quantize_int8":
        return "triton" if _ptx_kernels(args[0]) else REFERENCE  # type: ignore[arg-type]
    if op == "linear_4bit":
        return _linear_choice(*args[:3])  # type: ignore[arg-type]
    raise ValueError(f"unknown op {op!r}: expected quantize_4bit, dequantize_4bit, quantize_int8 or linear_4bit")


# ---- the ops -------------------------------------------------------------------------------------------


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    rounding: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """`minilora.quant.quantize_4bit`, with bitsandbytes' rounding of x's device unless `rounding` says."""
    rounding = rounding or _default_rounding(x)
    if record("quantize_4bit", implementation("quantize_4bit", x, rounding=rounding)) == REFERENCE:
        return blockwise.quantize_4bit(x, blocksize, quant_type, compress_statistics, rounding)
    from .quantize import quantize_4bit_triton

    return quantize_4bit_triton(x, blocksize, quant_type, compress_statistics)


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`minilora.quant.dequantize_4bit` (same bits, `out=` too), by the fastest implementation that applies."""
    name = _dequantize_choice(packed, state, dtype)
    if name != REFERENCE:
        blockwise.check_state_fits(packed, state)
        if out is not None:
            dtype = blockwise.check_out(out, state.numel, dtype, packed.device)
        dtype = dtype or state.dtype
    if name == "triton":
        from .dequant import dequantize_4bit_triton

        record("dequantize_4bit", name)
        return dequantize_4bit_triton(packed, state, dtype, out=out).view(state.shape)
    if name == "compiled-cpu":
        result = compiled.dequantize_4bit_compiled(packed, state, dtype, out)  # type: ignore[arg-type]
        if result is not None:
            record("dequantize_4bit", name)
            return result
    record("dequantize_4bit", REFERENCE)  # also when compiling failed: the reference from then on
    return blockwise.dequantize_4bit(packed, state, dtype, out=out)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`minilora.quant.quantize_int8_rowwise`, on an NVIDIA GPU with bitsandbytes' approximate division."""
    if record("quantize_int8", implementation("quantize_int8", weight)) == REFERENCE:
        return int8.quantize_int8_rowwise(weight)
    from .fastdiv import approx_divide

    return int8.quantize_int8_rowwise(weight, divide=approx_divide)


def lora_linear_4bit(  # matmul.lora_linear_4bit's arguments: this door decides whether it runs
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """W x + scaling * B A x in two launches, or None where this path does not apply (callers then run the
    reference, LoRALinear.forward): inference (no autograd) on CUDA, the GEMV's few rows (decode), x and the
    adapter in one 16-bit dtype. "triton-gemv-lora": the GEMV kernel adds the adapter's term in its epilogue."""
    if torch.is_grad_enabled() or not use_fast_path(x) or not (x.dtype == lora_a.dtype == lora_b.dtype):
        return None
    from .matmul import lora_linear_4bit as fast
    from .matmul import uses_gemv

    if not uses_gemv(x, state):
        return None
    return fast(x, packed, state, lora_a, lora_b, scaling)


def embedding_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] on ids' device, for a frozen table (no gradient) that may live in pinned host memory.
    "triton-host-gather": a CUDA kernel reads the rows from host memory (gather.py); "reference": F.embedding
    where the table is, the rows then moved to ids' device."""
    if use_fast_path(ids) and table.device.type == "cpu" and table.is_pinned() and table.is_contiguous():
        from .gather import gather_rows

        record("embedding_rows", "triton-host-gather")
        return gather_rows(table, ids)
    record("embedding_rows", REFERENCE)
    return F.embedding(ids.to(table.device), table).to(ids.device)


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x @ W.T with W rebuilt by `dequantize()` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.dequantize = dequantize
        return F.linear(x, dequantize())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.dequantize().to(grad_out.dtype), None


def dequantize_for_matmul(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight for one matmul, dropped straight after: on CPU into a buffer reused between calls."""
    if workspace.applies(packed.device, state.numel * dtype.itemsize):
        return dequantize_4bit(packed, state, dtype, out=workspace.scratch(state.numel, dtype, packed.device))
    return dequantize_4bit(packed, state, dtype)


def linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W.T (no bias) for a frozen 4-bit W, differentiable in x (W gets no gradient), in x's dtype.

    CUDA with Triton: kernels/matmul.py (a GEMV kernel for a few rows, else dequantize + cuBLAS), one custom
    operator that torch.compile traces. Elsewhere: W dequantized in the forward, dropped, and dequantized again
    in the backward, so that a frozen base costs its packed bytes only (QLoRA section 3); a CPU decode step (one
    row, no gradient) reads the bytes in compiled.gemv_4bit and never builds W. weight: W already
    dequantized (train/weight_cache.py): forward and backward read it instead, on every device ("cached").
    """
    choice = "cached" if weight is not None else _linear_choice(x, packed, state)
    if choice.startswith("triton"):
        from .matmul import linear_4bit as fast

        return fast(x, packed, state)  # records "triton-gemv", "triton-small-m" or "triton" as it runs
    if choice == "compiled-cpu-gemv":
        blockwise.check_state_fits(packed, state)
        y = compiled.gemv_4bit(x, packed, state)
        if y is not None:
            record("linear_4bit", choice)
            return y

    def dense() -> torch.Tensor:
        return dequantize_for_matmul(packed, state, x.dtype) if weight is None else weight.to(x.dtype)

    if torch.is_grad_enabled() and x.requires_grad:
        y = _FrozenWeightMatmul.apply(x, dense)
    else:  # no gradient to carry (inference, or a frozen input): the plain product, without autograd's cost
        y = F.linear(x, dense())
    record("linear_4bit", "cached" if weight is not None else _last.get("dequantize_4bit", REFERENCE))
    return y
