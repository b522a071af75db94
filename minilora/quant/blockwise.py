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

rounding="bnb_cuda" follows bitsandbytes' CUDA kernel instead, which stores a few different codes; its odd
details live in bnb_cuda_rule.py. Which rule a tensor gets by default, and whether a fast kernel runs, is the
door's choice (minilora/kernels/dispatch.py), never this file's: everything here is plain PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minilora.errors import QuantStateError

from . import bnb_cuda_rule
from .codebooks import get_code, nearest_code_index, sorted_midpoints
from .state import FLOAT_DTYPES, QUANT_TYPES, VALID_BLOCKSIZES, NestedState, QuantState, check_state_fits

# Work on at most this many elements at once: a chunk's float32 scratch is 4 MB, so quantizing or
# dequantizing a weight needs little memory beyond the weight and its packed codes. (Much smaller chunks
# fit the cache better on an idle machine but multiply the thread synchronisations: when another process
# holds a core, each of those waits, and a quantize took 100x longer.)
CHUNK = 1 << 20
# quantize_8bit(x, code, blocksize) -> (uint8 codes (n,), absmax (n_blocks,)): how double quantization stores the absmax
Quantize8bit = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def check_float_tensor(x: torch.Tensor, what: str, absmax: torch.Tensor | None = None) -> None:
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
        mask = ~torch.isfinite(x.reshape(-1))
        bad = mask.nonzero()[0, 0].item()
        raise ValueError(
            f"{what}: tensor holds NaN or Inf ({int(mask.sum())} of {x.numel()} values; "
            f"first at flat index {bad}: {x.reshape(-1)[bad].item()})"
        )


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


def quantize_4bit_codes(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", rounding: str = "bnb_cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 without packing: (code indices uint8 (n,), absmax float32 (n_blocks,)).

    `rounding`: "bnb_cpu" (bitsandbytes' CPU path: nearest code, ties to the lower one) or "bnb_cuda" (its CUDA
    kernel). "bnb_cpu" works through the tensor in chunks of whole blocks (CHUNK elements), so its scratch space
    stays a few megabytes whatever the tensor's size; "bnb_cuda" takes the tensor at once (float32 temporaries of
    its whole size: memory a GPU has, where the door runs it as one Triton kernel instead).
    """
    if rounding == "bnb_cuda":  # bitsandbytes' GPU bytes need its kernel's odd float details: bnb_cuda_rule.py
        absmax, scaled = bnb_cuda_rule.scale_blocks(x.reshape(-1), blocksize)
        return bnb_cuda_rule.code_index(scaled, quant_type), absmax
    if rounding != "bnb_cpu":
        raise ValueError(f"rounding {rounding!r} is not 'bnb_cpu' or 'bnb_cuda'")
    midpoints, order = sorted_midpoints(get_code(quant_type))
    bounds = midpoints.tolist()
    flat = x.reshape(-1)
    n = flat.numel()
    indices = torch.empty(n, dtype=torch.uint8, device=x.device)  # (n,)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)  # (n_blocks,)
    step = max(blocksize, CHUNK - CHUNK % blocksize)
    for start in range(0, n, step):
        chunk_absmax, scaled = _scale_blocks(flat[start : start + step], blocksize)
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
        indices[start : start + scaled.numel()] = nearest_code_index(scaled, bounds)
    if not torch.equal(order, torch.arange(16)):  # FP4: value rank -> bit pattern
        indices = order.to(torch.uint8, copy=True).to(x.device)[indices.long()]
    return indices, absmax


def _pad_index(quant_type: str, rounding: str, absmax: torch.Tensor) -> int:
    """The code stored in the unused low nibble of an odd count: that of a 0 in the last block. On CUDA, 0 in an
    all-zero block scales to NaN (index 0), as bitsandbytes' kernel reads past the end as zeros."""
    if rounding == "bnb_cpu":
        return _index_of_zero(quant_type)
    scaled = torch.tensor([float("nan") if float(absmax[-1]) == 0 else 0.0])
    return int(bnb_cuda_rule.code_index(scaled, quant_type)[0])


def _index_of_zero(quant_type: str) -> int:
    """The code index that 0.0 rounds to: the padding of an odd element count."""
    midpoints, order = sorted_midpoints(get_code(quant_type))
    return int(order[torch.bucketize(torch.zeros(1), midpoints)])


def check_quantize_args(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    """ValueError for a blocksize, quant_type or tensor quantize_4bit cannot take (NaN/Inf are checked later)."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    check_float_tensor(x, "quantize_4bit", absmax=torch.zeros(1))  # dtype and size only


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    rounding: str = "bnb_cpu",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor to packed 4-bit codes; bitsandbytes.functional.quantize_4bit's twin.

    Returns (packed uint8 ((n+1)//2, 1), QuantState). With compress_statistics the absmax is double
    quantized (`state.absmax` uint8, `state.offset`, `state.state2.absmax`). `rounding` (not in
    bitsandbytes): whose kernel to match, "bnb_cpu" or "bnb_cuda" (minilora.kernels.quantize_4bit picks the
    one of x's device, so that the bytes equal what bitsandbytes stores on the same device).
    """
    check_quantize_args(x, blocksize, quant_type)
    q, absmax = quantize_4bit_codes(x.detach(), blocksize, quant_type, rounding)
    check_float_tensor(x, "quantize_4bit", absmax=absmax)  # NaN/Inf show in their block's absmax
    packed = pack_4bit(q, pad_index=_pad_index(quant_type, rounding, absmax))
    return packed, new_state(x, absmax, blocksize, quant_type, compress_statistics, rounding)


def new_state(
    x: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    compress_statistics: bool,
    rounding: str = "bnb_cpu",
    quantize_8bit: Quantize8bit | None = None,
) -> QuantState:
    """The QuantState of x quantized with these absmax, double quantized (step 6) with compress_statistics."""
    state = QuantState(
        absmax=absmax,
        shape=x.shape,
        code=get_code(quant_type).to(x.device, copy=True),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=x.dtype,
    )
    return double_quantize(state, rounding=rounding, quantize_8bit=quantize_8bit) if compress_statistics else state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of every block, undoing double quantization when it was applied."""
    if state.absmax.numel() != state.n_blocks:
        raise QuantStateError(
            f"dequantize_absmax: absmax has {state.absmax.numel()} values, shape {list(state.shape)} in blocks of "
            f"{state.blocksize} needs {state.n_blocks}"
        )
    if state.state2 is None:
        return state.absmax.float()
    assert state.offset is not None, "double-quantized state without offset"
    s2 = state.state2
    return dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize) + state.offset


def check_out(out: torch.Tensor, n: int, dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The output dtype (`dtype`, else out's); ValueError unless `out` can take n such values on `device`."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected a tensor, got {type(out).__name__}")
    dtype = dtype or out.dtype
    problems = []
    if out.numel() != n:
        problems.append(f"{out.numel()} elements (shape {list(out.shape)}), the weight has {n}")
    if out.dtype != dtype:
        problems.append(f"dtype {out.dtype}, asked for {dtype}")
    if out.device != device:
        problems.append(f"device {out.device}, the codes are on {device}")
    if not out.is_contiguous():
        problems.append("not contiguous")
    if problems:
        raise ValueError("out: " + "; ".join(problems))
    return dtype


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: byte b -> (code[b >> 4], code[b & 15]), both values a packed byte holds."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """code[index] * absmax[block] in float32, cast to `dtype` (default: the original dtype).

    out: a contiguous tensor of as many elements, on the codes' device, to write the result into (as in
    bitsandbytes' `dequantize_4bit(..., out=)`); its dtype is the output dtype unless `dtype` says otherwise,
    which must then agree. The result is `out` viewed with the weight's shape. Reusing one buffer saves mapping
    a new tensor's pages at every call, over half the time of a large dequantize on CPU (kernels/workspace.py).

    This is the reference; minilora.kernels.dequantize_4bit gives the same bits faster (a compiled CPU loop,
    a Triton kernel) where it can.
    """
    check_state_fits(packed, state)  # sizes only (no data read, no device sync): a few microseconds
    if out is not None:
        dtype = check_out(out, state.numel, dtype, packed.device)
    dtype = dtype or state.dtype
    flat = torch.empty(state.numel, dtype=dtype, device=packed.device) if out is None else out.view(-1)
    dequantize_4bit_from(packed, state, flat, 0)
    return flat.view(state.shape)


def dequantize_4bit_from(packed: torch.Tensor, state: QuantState, flat: torch.Tensor, start: int) -> None:
    """Write elements start.. (start a whole number of blocks) of the dequantized weight into flat (n,).

    Each byte is looked up once in a 256-entry table of value pairs, which unpacks and decodes in one step.
    The work goes in chunks of whole blocks, so the float32 scratch stays small whatever the output dtype.
    """
    n, blocksize = state.numel, state.blocksize
    absmax = dequantize_absmax(state)  # (n_blocks,) float32
    table = _byte_table(state.code.to(packed.device).float())  # (256, 2)
    packed = packed.reshape(-1)
    for begin in range(start, n, CHUNK):  # CHUNK: a multiple of every blocksize, and even
        stop = min(begin + CHUNK, n)
        values = F.embedding(packed[begin // 2 : (stop + 1) // 2].int(), table).view(-1)[: stop - begin]
        full = (stop - begin) - (stop - begin) % blocksize
        first_block = begin // blocksize
        chunk = flat[begin:stop]
        chunk[:full] = (
            values[:full].view(-1, blocksize) * absmax[first_block : first_block + full // blocksize, None]
        ).view(-1)
        if full < stop - begin:  # the partial last block of the tensor
            chunk[full:] = values[full:] * absmax[-1]


# ---- 8-bit blockwise quantization, used for double quantization ----------------------------------------

# bitsandbytes' CPU kernel does not search the code for the nearest value: it maps the normalised value
# onto a grid of 65536 steps over [-1, 1] and reads the code index from a table built once per code
# (index = count of code midpoints below the grid point). The chosen code can then differ from the
# nearest one by a few steps where codes are closer than the grid (near zero) or a value sits near a
# midpoint. minilora reproduces that table so that double-quantized files are bit-identical; pass
# rounding="nearest" for true nearest-code rounding.
_GRID = 65536


def _grid_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) code index of each grid point: the count of code midpoints below it."""
    return _grid_table_of(tuple(code.tolist())).to(code.device)


@functools.cache
def _grid_table_of(code: tuple[float, ...]) -> torch.Tensor:
    values = torch.tensor(code, dtype=torch.float32)
    midpoints = (values[:-1] + values[1:]) * 0.5  # (255,)
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)
    return torch.searchsorted(midpoints, grid, side="left")  # (65536,)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, rounding: str = "bnb_cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 x blockwise to indices into a sorted 256-value code: (uint8 (n,), absmax (n_blocks,)).

    rounding: "bnb_cpu" (bitsandbytes' CPU grid, above), "bnb_cuda" (its CUDA kernel: bnb_cuda_rule.py)
    or "nearest" (the nearest code, ties to the lower one).
    """
    if rounding == "bnb_cuda":
        absmax, scaled = bnb_cuda_rule.scale_blocks(x.reshape(-1), blocksize)
        return bnb_cuda_rule.code_index_8bit(scaled, code.float()).to(torch.uint8), absmax
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block stores index 0 (whatever code[0] is) with absmax 0, as the reference does.
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    # A subnormal absmax has an infinite reciprocal: its values scale to +-inf (clamped to +-1, as bitsandbytes'
    # CPU kernel stores them) and its zeros, the padding included, to NaN, which must not index the grid.
    scaled = (blocks * (1.0 / safe).unsqueeze(1)).clamp_(-1, 1).nan_to_num_(nan=0.0)
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


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """code[q] * absmax[block], float32 (flat). Without padding or reshapes, so torch.compile can fuse it into
    the kernel that uses it (kernels/compiled.py decodes double-quantized absmax this way inside its loop)."""
    q = q.reshape(-1)
    if not torch.compiler.is_compiling() and absmax.numel() != -(-q.numel() // blocksize):
        raise QuantStateError(
            f"dequantize_blockwise_8bit: {absmax.numel()} absmax values for {q.numel()} codes in blocks of "
            f"{blocksize}; {-(-q.numel() // blocksize)} needed"
        )
    return code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]


def double_quantize(
    state: QuantState, nested_blocksize: int = 256, rounding: str = "bnb_cpu", quantize_8bit: Quantize8bit | None = None
) -> QuantState:
    """Replace the float32 absmax by 8-bit codes of (absmax - mean) (QLoRA section 3, Double Quantization).

    Positive absmax values would waste the sign bit of the signed 8-bit code; centring them on their mean
    uses the whole range. `rounding`: see quantize_blockwise_8bit, which quantizes the centred absmax unless
    `quantize_8bit(x, code, blocksize)` is given (the door passes its Triton kernel of the same rule on a GPU).
    """
    assert state.state2 is None, "state is already double quantized"
    offset = state.absmax.mean()
    if not bool(torch.isfinite(offset)):
        # Weights near float32's limit (|x| ~ 1e38) are finite, but the mean of their absmax overflows; the
        # 8-bit quantizer would then index its table with NaN. bitsandbytes computes the same float32 mean.
        raise ValueError(
            f"double quantization: the mean of the block absmax overflows float32 (largest absmax "
            f"{state.absmax.max().item():.4g}); weights this large cannot be double-quantized: "
            "use compress_statistics=False (--no-double-quant), or rescale the weights"
        )
    code8 = get_code("dynamic").to(state.absmax.device)
    # bitsandbytes rounds the nested codes differently on each device: its CPU kernel through a 65536-point
    # grid, its CUDA kernel by a binary search (rounding="bnb_cuda").
    if quantize_8bit is None:
        q, nested_absmax = quantize_blockwise_8bit(state.absmax - offset, code8, nested_blocksize, rounding)
    else:
        q, nested_absmax = quantize_8bit(state.absmax - offset, code8, nested_blocksize)
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
