"""Triton kernel: NF4/FP4 blockwise dequantization (with or without double quant), bit-identical to
`minilora.quant.dequantize_4bit`.

The reference computes, for element i of a weight quantized in blocks of `blocksize`:

    absmax[b] = code8[q[b]] * nested_absmax[b // 256] + offset     (double quant; else the float32 absmax)
    out[i]    = code[nibble(i)] * absmax[i // blocksize]            (float32, then cast to the output dtype)

Each Triton program takes NB whole quantization blocks: a (NB, blocksize/2) tile of packed bytes. The
absmax is computed once per block (NB values); the two nibbles of each byte are looked up in the 16-entry
code (64 bytes: one cache line, so each gather is a single L1 wavefront), scaled, cast, and written
together as one 32-bit word (64-bit for float32 output), element 2j in the low half: vector loads and
vector stores, 32-bit index arithmetic. (Versions 1 and 2, with tl.interleave and with one lane per
output element, and their timings are in benchmarks/gpu/NOTES.md.) Every input byte is read once and every output
written once: the kernel moves n/2 + n/blocksize (+ n/(256 blocksize) * 4) bytes in and n * sizeof(dtype)
out, so its floor is the copy bandwidth.

Bit-identity: the operations and their order are the reference's, in float32. The one trap is the
compiler fusing `code8[q] * nested + offset` into one FMA (a different rounding): the kernel is compiled
with `enable_fp_fusion=False`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.state import QuantState
from .platform import launch_device

# Bytes of packed input per program (NB = TILE_BYTES // (blocksize / 2) blocks, at least one).
TILE_BYTES = 4096


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # uint8 (n / 2,)
    absmax_ptr,  # float32 (n_blocks,), or uint8 codes with NESTED
    code_ptr,  # float32 (16,)
    nested_absmax_ptr,  # float32 (ceil(n_blocks / NESTED_BS),)   (NESTED only)
    code8_ptr,  # float32 (256,)                                  (NESTED only)
    offset_ptr,  # float32 ()                                      (NESTED only)
    out_ptr,  # (n / 2,) int32 words (16-bit outputs) or int64 words (float32 outputs): one per byte
    n_bytes,
    n_blocks,
    HALF: tl.constexpr,  # blocksize // 2: bytes per quantization block
    NB: tl.constexpr,  # quantization blocks per program
    NESTED: tl.constexpr,
    NESTED_BS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,  # tl.bfloat16, tl.float16 or tl.float32
):
    # 64-bit arithmetic only for the program's base offsets; everything per element is 32-bit.
    first_block = tl.program_id(0).to(tl.int64) * NB
    blk = tl.arange(0, NB)  # (NB,) blocks of this program
    in_range = blk < n_blocks - first_block
    if NESTED:
        q = tl.load(absmax_ptr + first_block + blk, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + (first_block + blk) // NESTED_BS, mask=in_range, other=0.0)
        absmax = tl.load(code8_ptr + q) * scale + tl.load(offset_ptr)  # no FMA: enable_fp_fusion=False
    else:
        absmax = tl.load(absmax_ptr + first_block + blk, mask=in_range, other=0.0)

    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (NB, HALF) bytes of this program
    ok = byte < n_bytes - first_block * HALF
    packed = tl.load(packed_ptr + first_block * HALF + byte, mask=ok, other=0).to(tl.int32)
    high = (tl.load(code_ptr + (packed >> 4)) * absmax[:, None]).to(OUT_DTYPE)  # element 2j
    low = (tl.load(code_ptr + (packed & 15)) * absmax[:, None]).to(OUT_DTYPE)  # element 2j + 1
    # Both elements of a byte go out as one little-endian word, element 2j in the low half: contiguous
    # vector stores with no shuffle between lanes.
    if OUT_DTYPE == tl.float32:
        word = (high.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (
            low.to(tl.int32, bitcast=True).to(tl.int64) << 32
        )
    else:
        word = (high.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (
            low.to(tl.int16, bitcast=True).to(tl.int32) << 16
        )
    tl.store(out_ptr + first_block * HALF + byte, word, mask=ok)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_WORD_DTYPES = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def _weight_pointers(packed: torch.Tensor, state: QuantState, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The 4-bit kernels' weight arguments: (packed flat, absmax, code, nested_absmax, code8, offset) as contiguous
    device tensors; dummies without nesting."""
    absmax = state.absmax.reshape(-1).contiguous()
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    if state.state2 is None:
        return packed.reshape(-1), absmax, code, absmax, code, absmax
    assert state.offset is not None, "double-quantized state without offset"
    nested = state.state2.absmax.to(device=device, dtype=torch.float32).contiguous()
    code8 = state.state2.code.to(device=device, dtype=torch.float32).contiguous()
    offset = state.offset.to(device=device, dtype=torch.float32).reshape(1)
    return packed.reshape(-1), absmax, code, nested, code8, offset


def dequantize_4bit_triton(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`minilora.quant.dequantize_4bit` on a CUDA tensor, in one kernel launch. Same result, bit for bit."""
    dtype = dtype or state.dtype
    n = state.numel
    if packed.numel() * 2 < n:
        raise ValueError(
            f"packed tensor has {packed.numel()} bytes, but shape {list(state.shape)} needs {(n + 1) // 2}"
        )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize_4bit_triton: output dtype {dtype} is not float32, float16 or bfloat16")
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    assert out.is_contiguous() and out.numel() == n and out.dtype == dtype, "bad output buffer"
    # The kernel writes one word per packed byte (two outputs). An odd count writes into a scratch of n + 1.
    target = out.reshape(-1) if n % 2 == 0 else torch.empty(n + 1, dtype=dtype, device=packed.device)
    half = state.blocksize // 2
    nb = max(1, TILE_BYTES // half)
    n_blocks = state.n_blocks
    grid = (triton.cdiv(n_blocks, nb),)
    with launch_device(packed):
        _dequantize_4bit_kernel[grid](
            *_weight_pointers(packed, state, packed.device),
            target.view(_WORD_DTYPES[dtype]),
            (n + 1) // 2,
            n_blocks,
            HALF=half,
            NB=nb,
            NESTED=state.state2 is not None,
            NESTED_BS=state.state2.blocksize if state.state2 is not None else 256,
            OUT_DTYPE=_TL_DTYPES[dtype],
            num_warps=4,
            enable_fp_fusion=False,
        )
    if n % 2:
        out.reshape(-1).copy_(target[:n])
    return out
