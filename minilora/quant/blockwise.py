"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, as in the QLoRA paper, section 3.

Bit budget: 4 bits per weight + one float32 absmax per block = 4 + 32/64 = 4.5 bits at blocksize 64;
with double quantization the absmax becomes 8 bits plus one float32 per 256 blocks:
4 + 8/64 + 32/(64*256) ~= 4.127 bits per weight.

The recipe, for a tensor W (any shape, flattened row-major; a block may span two rows):

    1. cut W into blocks of `blocksize` consecutive values (the last one may be shorter);
    2. absmax[b] = max |W| in block b;                      (float32)
    3. every value is divided by its block's absmax -> [-1, 1];
    4. each normalised value becomes the index of the nearest code (ties go to the lower index);
    5. two 4-bit indices share a byte, the first in the HIGH nibble;
    6. (double quant) absmax - mean(absmax) is quantized again, to 8 bits in blocks of 256.

Dequantization reads it backwards: code[index] * absmax[block], computed in float32, then cast.

A worked 8-element example (blocksize 8) is in docs/quantization.md, printed by
examples/quantization_walkthrough.py.

Everything here reproduces bitsandbytes 0.50 on CPU bit for bit (tests/quant/test_bnb_parity.py),
including two of its details: full blocks are scaled by the reciprocal of absmax while a partial last
block is divided by it, and a zero absmax is floored at 1e-38 for the scaling (a partial all-zero last
block therefore stores 1e-38, a full one stores 0).

On a CUDA tensor the quantizer follows bitsandbytes' CUDA kernel instead (rounding="bnb_cuda", the default
there), which stores a few different codes: see "bitsandbytes' CUDA rounding" below.
"""

from __future__ import annotations

import functools
import os
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels.dispatch import reference_forced, triton_available
from . import compiled
from .codebooks import get_code, get_code_on
from .state import FLOAT_DTYPES, QUANT_TYPES, VALID_BLOCKSIZES, NestedState, QuantState

# Work on at most this many elements at once: a chunk's float32 scratch is 4 MB, so quantizing or
# dequantizing a weight needs little memory beyond the weight and its packed codes. (Much smaller chunks
# fit the cache better on an idle machine but multiply the thread synchronisations: when another process
# holds a core, each of those waits, and a quantize took 100x longer.)
CHUNK = 1 << 20


def _check_float_tensor(x: torch.Tensor, what: str, absmax: torch.Tensor | None = None) -> None:
    """ValueError for a non-float or empty tensor, or one holding NaN/Inf.

    `absmax` (per block or per row, already computed by the caller) makes the finiteness check cheap: a
    NaN or Inf anywhere shows in its block's absmax, and only then is the tensor itself searched.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype {x.dtype} is not one of float32, float16, bfloat16")
    if x.numel() == 0:
        raise ValueError(f"{what}: tensor of shape {tuple(x.shape)} is empty")
    if absmax is not None and bool(torch.isfinite(absmax).all()):
        return
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(-1))).nonzero()[0, 0].item()
        raise ValueError(f"{what}: tensor holds NaN or Inf (first at flat index {bad}: {x.reshape(-1)[bad].item()})")


def _sorted_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision boundaries of nearest-code rounding: midpoints of the codes in value order.

    Returns (midpoints (15,), order (16,)) where order[k] is the code index of the k-th smallest code.
    A stable sort keeps equal codes (FP4's two zeros) in index order.
    """
    order = torch.sort(code, stable=True).indices
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) * 0.5, order


def pack_4bit(q: torch.Tensor, pad_index: int = 0) -> torch.Tensor:
    """Two 4-bit indices per byte, element 2i in the high nibble: (q[0::2] << 4) | q[1::2].

    An odd count is padded with `pad_index` (the quantizer passes the code of 0.0: 7 for NF4, 0 for FP4).
    Returns uint8 of shape ((n + 1) // 2, 1).
    """
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad_index)])
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # (n/2, 1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: the first n indices, as int64."""
    packed = packed.reshape(-1)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # (2 * n_bytes,)
    return q[:n].long()


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per block and the values scaled to [-1, 1], both float32 (steps 1-3 of the recipe)."""
    flat = flat.float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def nearest_code_index(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """Step 4: the rank of the nearest code = how many decision boundaries lie strictly below the value.

    A value exactly on a boundary is not counted past it, so ties go to the lower code. Returns uint8.
    """
    index = (scaled > midpoints[0]).to(torch.uint8)
    for boundary in midpoints[1:]:
        index += scaled > boundary
    return index


def quantize_4bit_codes(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", rounding: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 without packing: (code indices uint8 (n,), absmax float32 (n_blocks,)).

    `rounding`: "bnb_cpu" (bitsandbytes' CPU path: nearest code, ties to the lower one) or "bnb_cuda" (its CUDA
    kernel); default: the kernel of the device x is on. "bnb_cpu" works through the tensor in chunks of whole
    blocks (CHUNK elements), so its scratch space stays a few megabytes whatever the tensor's size; "bnb_cuda"
    takes the tensor at once (float32 temporaries of its whole size: memory a GPU has, and quantize_4bit runs
    it there as one Triton kernel instead).
    """
    rounding = rounding or ("bnb_cuda" if x.is_cuda else "bnb_cpu")
    if rounding == "bnb_cuda":
        absmax, scaled = _scale_blocks_cuda(x.reshape(-1), blocksize)
        return _cuda_code_index(scaled, quant_type), absmax
    if rounding != "bnb_cpu":
        raise ValueError(f"rounding {rounding!r} is not 'bnb_cpu' or 'bnb_cuda'")
    midpoints, order = _sorted_midpoints(get_code(quant_type))
    bounds = midpoints.tolist()
    flat = x.reshape(-1)
    n = flat.numel()
    indices = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    # On a GPU the whole tensor goes at once: memory is less tight and every extra launch costs.
    step = n if x.is_cuda else max(blocksize, CHUNK - CHUNK % blocksize)
    for start in range(0, n, step):
        chunk_absmax, scaled = _scale_blocks(flat[start : start + step], blocksize)
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
        indices[start : start + scaled.numel()] = nearest_code_index(scaled, bounds)
    if not torch.equal(order, torch.arange(16)):  # FP4: value rank -> bit pattern
        indices = order.to(torch.uint8, copy=True).to(x.device)[indices.long()]
    return indices, absmax


# ---- bitsandbytes' CUDA rounding ------------------------------------------------------------------------
#
# bitsandbytes' CUDA quantizer (built with --use_fast_math) stores a few codes that its CPU path would not.
# benchmarks/gpu/rounding_probe.py counted them on random weights, and these are the differences:
#  1. the scale is x * (1 / absmax) with the GPU's approximate reciprocal (kernels/fastdiv.py), not IEEE;
#     values and products below 2**-126 are flushed to zero;
#  2. its decision boundaries are decimal constants in its source, each read once by the compiler as a
#     float32. For NF4 they are the double-precision midpoints of the codes, printed in Python's shortest
#     form: reading "0.5016634166240692" as a float32 gives the value one step below the float32 midpoint
#     that the CPU path computes. For FP4 they are hand-written decimals of the midpoints (7/24 as
#     0.29166667, 7/12 as 0.583333, ...): FP4_CUDA_BOUNDARIES;
#  3. FP4 takes the sign first (x < 0 sets bit 3) and rounds the magnitude: a small negative value gets -0
#     (index 8) where the CPU's nearest-code search gives +0 (index 0), and a small positive one +0 where the
#     CPU gives -0 (0.5% of the codes of a Gaussian weight; the dequantized values are equal);
#  4. an all-zero block keeps absmax 0 (the CPU floors a partial last block's at 1e-38); its reciprocal is
#     inf and 0 * inf is NaN, which passes no boundary: index 0 (NF4: -1.0 x 0).
# The boundaries of FP4's positive half, as bitsandbytes' CUDA source writes them (text: read once to float32).
FP4_CUDA_BOUNDARIES = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
_FLT_MIN = 2.0**-126  # smallest normal float32: below it, fast-math code sees zero


def float32_from_decimal(text: str) -> float:
    """The float32 nearest to a decimal literal, rounded once (ties to even), as a C compiler reads `0.5f`.

    float(np.float32(float(text))) rounds twice (to double, then to float32) and can land one step off when
    the decimal lies within a double's precision of the midpoint between two float32 values.
    """
    exact = Fraction(text)
    guess = np.float32(float(exact))
    below, above = np.nextafter(guess, np.float32(-np.inf)), np.nextafter(guess, np.float32(np.inf))

    def distance_then_odd(c: np.float32) -> tuple[Fraction, int]:
        return abs(Fraction(float(c)) - exact), int(np.array(c, dtype=np.float32).view(np.uint32)) & 1

    return float(min((below, guess, above), key=distance_then_odd))


def _ptx_kernels_apply(x: torch.Tensor) -> bool:
    """Whether the Triton kernels with inline PTX (kernels/fastdiv.py, kernels/quantize.py) may run on x: an
    NVIDIA GPU (not ROCm, whose compiler takes no PTX), Triton compiled (not its CPU interpreter), the reference
    not forced."""
    return (
        x.is_cuda
        and torch.version.hip is None
        and triton_available()
        and not reference_forced()
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
    )


def _bnb_cuda_divide(numerator: float, den: torch.Tensor) -> torch.Tensor:
    """numerator / den as bitsandbytes' CUDA kernels compute it: the GPU's approximate division where a Triton
    kernel can run (kernels/fastdiv.py); elsewhere, or with the reference forced, IEEE division (which can move
    a value on a decision boundary to the next code: a few per million)."""
    if _ptx_kernels_apply(den):
        from ..kernels.fastdiv import approx_divide

        return approx_divide(numerator, den)
    return numerator / den.float()


def _scale_blocks_cuda(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax float32 (n_blocks,), scaled float32 (n,)) as bitsandbytes' CUDA kernel computes them: subnormal
    inputs flushed, absmax over each block's own values (0 for an all-zero block), x * (1 / absmax) with the
    fast reciprocal, subnormal products flushed. An all-zero block scales to NaN (0 * inf)."""
    flat = flat.float()
    flat = torch.where(flat.abs() < _FLT_MIN, torch.zeros_like(flat), flat)
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * _bnb_cuda_divide(1.0, absmax).unsqueeze(1)).reshape(-1)[:n]
    scaled = torch.where(scaled.abs() < _FLT_MIN, torch.zeros_like(scaled), scaled)  # NaN stays NaN
    return absmax, scaled


@functools.cache
def _cuda_boundaries(quant_type: str) -> tuple[list[float], list[int]]:
    """(boundaries, rank -> code index) of bitsandbytes' CUDA rule. NF4: the 15 boundaries over the whole
    range; FP4: the 7 boundaries of the magnitude and the indices of the positive codes in value order."""
    code = get_code(quant_type)
    if quant_type == "fp4":
        positive = torch.sort(code[:8], stable=True).indices.tolist()
        return [float32_from_decimal(t) for t in FP4_CUDA_BOUNDARIES], positive
    ordered, order = torch.sort(code, stable=True)
    pairs = zip(ordered[:-1].tolist(), ordered[1:].tolist(), strict=True)
    return [float32_from_decimal(repr((a + b) / 2)) for a, b in pairs], order.tolist()


def _cuda_code_index(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Step 4 by bitsandbytes' CUDA rule: uint8 code indices of scaled values (NaN -> rank 0)."""
    boundaries, rank_to_index = _cuda_boundaries(quant_type)
    lookup = torch.tensor(rank_to_index, dtype=torch.uint8, device=scaled.device)
    if quant_type != "fp4":
        return lookup[nearest_code_index(scaled, boundaries).long()]
    magnitude = lookup[nearest_code_index(scaled.abs(), boundaries).long()]
    return magnitude + (scaled < 0).to(torch.uint8) * 8


def _pad_index(quant_type: str, rounding: str, absmax: torch.Tensor) -> int:
    """The code stored in the unused low nibble of an odd count: that of a 0 in the last block. On CUDA, 0 in an
    all-zero block scales to NaN (index 0), as bitsandbytes' kernel reads past the end as zeros."""
    if rounding == "bnb_cpu":
        return _index_of_zero(quant_type)
    scaled = torch.tensor([float("nan") if float(absmax[-1]) == 0 else 0.0])
    return int(_cuda_code_index(scaled, quant_type)[0])


def _index_of_zero(quant_type: str) -> int:
    """The code index that 0.0 rounds to: the padding of an odd element count."""
    midpoints, order = _sorted_midpoints(get_code(quant_type))
    return int(order[torch.bucketize(torch.zeros(1), midpoints)])


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    rounding: str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor to packed 4-bit codes; bitsandbytes.functional.quantize_4bit's twin.

    Returns (packed uint8 ((n+1)//2, 1), QuantState). With compress_statistics the absmax is double
    quantized (`state.absmax` uint8, `state.offset`, `state.state2.absmax`). `rounding` (not in
    bitsandbytes): whose kernel to match, "bnb_cpu" or "bnb_cuda"; by default that of x's device, so that
    the bytes equal what bitsandbytes stores on the same device.
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    _check_float_tensor(x, "quantize_4bit", absmax=torch.zeros(1))  # dtype and size only
    rounding = rounding or ("bnb_cuda" if x.is_cuda else "bnb_cpu")
    if rounding == "bnb_cuda" and _ptx_kernels_apply(x):
        # the same rule in one Triton launch (kernels/quantize.py)
        from ..kernels.quantize import quantize_4bit_triton

        boundaries, rank_to_index = _cuda_boundaries(quant_type)
        packed, absmax = quantize_4bit_triton(x.detach(), blocksize, boundaries, rank_to_index, quant_type == "fp4")
        _check_float_tensor(x, "quantize_4bit", absmax=absmax)  # the kernel passes NaN/Inf into the absmax
    else:
        q, absmax = quantize_4bit_codes(x.detach(), blocksize, quant_type, rounding)
        _check_float_tensor(x, "quantize_4bit", absmax=absmax)  # NaN/Inf show in their block's absmax
        packed = pack_4bit(q, pad_index=_pad_index(quant_type, rounding, absmax))
    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        code=get_code_on(quant_type, x.device).clone(),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=x.dtype,
    )
    if compress_statistics:
        state = double_quantize(state)
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of every block, undoing double quantization when it was applied."""
    if state.state2 is None:
        return state.absmax.float()
    assert state.offset is not None, "double-quantized state without offset"
    s2 = state.state2
    return dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize) + state.offset


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: byte b -> (code[b >> 4], code[b & 15]), both values a packed byte holds."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def _triton_dequantize_applies(packed: torch.Tensor, dtype: torch.dtype) -> bool:
    """CUDA uint8 codes, a float output, Triton importable, the reference not forced, not inside a trace."""
    return (
        packed.is_cuda
        and packed.dtype == torch.uint8
        and dtype in FLOAT_DTYPES
        and triton_available()
        and not reference_forced()
        and not torch.compiler.is_compiling()
    )


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code[index] * absmax[block] in float32, cast to `dtype` (default: the original dtype).

    Each byte is looked up once in a 256-entry table of value pairs, which unpacks and decodes in one step.
    The work goes in chunks of whole blocks, so the float32 scratch stays small whatever the output dtype.

    Large CPU tensors first go through compiled.py, which computes the same bits in one vectorized loop
    (a table lookup cannot be vectorized in eager PyTorch); the loop below is the reference, and finishes
    what the compiled kernel leaves: a partial last block. CUDA tensors go to the Triton kernel
    (minilora/kernels/dequant.py, the same bits in one launch). `with minilora.kernels.reference_mode():`
    (or MINILORA_REFERENCE=1) runs the loop below everywhere.
    """
    n, blocksize = state.numel, state.blocksize
    if packed.numel() * 2 < n:
        raise ValueError(
            f"packed tensor has {packed.numel()} bytes, but shape {list(state.shape)} needs {(n + 1) // 2}"
        )
    dtype = dtype or state.dtype
    if _triton_dequantize_applies(packed, dtype):
        from ..kernels.dequant import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state, dtype)
    absmax = dequantize_absmax(state)
    done = 0  # elements already written by the compiled kernel
    if compiled.use_compiled(packed, n, dtype) and n >= blocksize:
        fast = compiled.dequantize_blocks(packed, absmax, state.code, blocksize, n // blocksize, dtype)
        if fast is not None:
            if fast.numel() == n:
                return fast.view(state.shape)
            done = fast.numel()
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if done:
        out[:done] = fast
    table = _byte_table(state.code.to(packed.device).float())
    packed = packed.reshape(-1)
    step = CHUNK  # a multiple of every blocksize, and even
    for start in range(done, n, step):  # done is a whole number of blocks
        stop = min(start + step, n)
        values = F.embedding(packed[start // 2 : (stop + 1) // 2].int(), table).view(-1)[: stop - start]
        full = (stop - start) - (stop - start) % blocksize
        first_block = start // blocksize
        chunk = out[start:stop]
        chunk[:full] = (
            values[:full].view(-1, blocksize) * absmax[first_block : first_block + full // blocksize, None]
        ).view(-1)
        if full < stop - start:  # the partial last block of the tensor
            chunk[full:] = values[full:] * absmax[-1]
    return out.view(state.shape)


# ---- 8-bit blockwise quantization, used for double quantization ----------------------------------------

# bitsandbytes' CPU kernel does not search the code for the nearest value: it maps the normalised value
# onto a grid of 65536 steps over [-1, 1] and reads the code index from a table built once per code
# (index = count of code midpoints below the grid point). The chosen code can then differ from the
# nearest one by a few steps where codes are closer than the grid (near zero) or a value sits near a
# midpoint. minilora reproduces that table so that double-quantized files are bit-identical; pass
# rounding="nearest" for true nearest-code rounding.
_GRID = 65536
_grid_tables: dict[tuple[int, str], torch.Tensor] = {}


def _grid_table(code: torch.Tensor) -> torch.Tensor:
    key = (hash(tuple(code.tolist())), str(code.device))
    if key not in _grid_tables:
        midpoints = (code[:-1] + code[1:]) * 0.5  # (255,)
        grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32, device=code.device)) / (_GRID - 1)
        _grid_tables[key] = torch.searchsorted(midpoints, grid, side="left")  # (65536,)
    return _grid_tables[key]


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, rounding: str = "bnb_cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 x blockwise to indices into a sorted 256-value code: (uint8 (n,), absmax (n_blocks,)).

    rounding: "bnb_cpu" (bitsandbytes' CPU grid, above), "bnb_cuda" (its CUDA kernel: _bnb_cuda_8bit_index)
    or "nearest" (the nearest code, ties to the lower one).
    """
    if rounding == "bnb_cuda":
        if _ptx_kernels_apply(x):
            from ..kernels.quantize import quantize_8bit_triton  # the same rule in one launch

            return quantize_8bit_triton(x, code, blocksize)
        absmax, scaled = _scale_blocks_cuda(x.reshape(-1), blocksize)
        return _bnb_cuda_8bit_index(scaled, code.float()).to(torch.uint8), absmax
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block stores index 0 (whatever code[0] is) with absmax 0, as the reference does.
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scaled = (blocks * (1.0 / safe).unsqueeze(1)).clamp_(-1, 1)
    if rounding == "bnb_cpu":
        grid_index = (((scaled + 1.0) * 0.5) * (_GRID - 1) + 0.5).to(torch.int64)
        q = _grid_table(code)[grid_index]
    elif rounding == "nearest":
        midpoints = (code[:-1] + code[1:]) * 0.5
        q = torch.bucketize(scaled, midpoints)
    else:
        raise ValueError(f"rounding {rounding!r} is not 'bnb_cpu', 'bnb_cuda' or 'nearest'")
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def _bnb_cuda_8bit_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Code indices (int64) of scaled values by bitsandbytes' CUDA rule for a sorted 256-value code.

    Its kernel does not take the nearest code: a 7-step binary search from index 127 (steps 64 .. 1) leaves a
    pivot and the last indices visited below and above it, and the value goes to the neighbour whose midpoint
    with the pivot it passes. Those "neighbours" need not be adjacent to the pivot, so near some codes the
    choice differs from nearest-code rounding (1 nested absmax code in 262,144 of a 4096x4096 weight). A NaN
    (an all-zero block) passes no comparison and ends at index 0. Run here on whole tensors, one step at a time.
    """
    pivot = torch.full(scaled.shape, 127, dtype=torch.int64, device=scaled.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(scaled, -1.0), torch.full_like(scaled, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = scaled > value
        lower_pivot, lower = torch.where(above, pivot, lower_pivot), torch.where(above, value, lower)
        upper_pivot, upper = torch.where(above, upper_pivot, pivot), torch.where(above, upper, value)
        pivot = torch.where(above, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    go_up = scaled > (upper + value) * 0.5
    go_down = scaled < (lower + value) * 0.5
    return torch.where(scaled > value, torch.where(go_up, upper_pivot, pivot), torch.where(go_down, lower_pivot, pivot))


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """code[q] * absmax[block], float32."""
    n = q.numel()
    values = code[q.reshape(-1).long()]
    pad = (-n) % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


def double_quantize(state: QuantState, nested_blocksize: int = 256) -> QuantState:
    """Replace the float32 absmax by 8-bit codes of (absmax - mean) (QLoRA section 3, Double Quantization).

    Positive absmax values would waste the sign bit of the signed 8-bit code; centring them on their mean
    uses the whole range.
    """
    assert state.state2 is None, "state is already double quantized"
    offset = state.absmax.mean()
    code8 = get_code_on("dynamic", state.absmax.device)
    # bitsandbytes rounds the nested codes differently on each device: its CPU kernel through a 65536-point
    # grid, its CUDA kernel by a binary search. Follow the kernel of the device the tensor is on.
    rounding = "bnb_cuda" if state.absmax.is_cuda else "bnb_cpu"
    q, nested_absmax = quantize_blockwise_8bit(state.absmax - offset, code8, nested_blocksize, rounding)
    return QuantState(
        absmax=q,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=offset,
        state2=NestedState(nested_absmax, code8.clone(), nested_blocksize, torch.float32),
    )
