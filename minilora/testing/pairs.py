"""Ready-made quantizer pairs: minilora's own NF4/FP4 and bitsandbytes' (the reference), for the checks.

    >>> from minilora.testing import check_all, minilora_pair
    >>> check_all(minilora_pair("nf4", 64), torch.randn(1000))     # passes silently

Double quantization stores each block's absmax as an 8-bit code of (absmax - mean) scaled per 256 blocks
(QLoRA section 3), so the pair states an extra error per block: the nested absmax times DQ_SCALE_ERROR.
"""

from __future__ import annotations

from typing import Any

import torch

from minilora.quant import dequantize_4bit, get_code, quantize_4bit
from minilora.testing.checks import BlockFormat, QuantizerPair, max_half_gap

# Double quantization stores each absmax with an error of at most nested_absmax x DQ_SCALE_ERROR: the
# largest half-gap of the 8-bit dynamic code, plus half a step of the 65536-point grid that bitsandbytes'
# CPU kernel rounds through, plus float slack.
DQ_SCALE_ERROR = max_half_gap(get_code("dynamic")) + 1.0 / 65535 + 1e-6


def fourbit_format(quant_type: str = "nf4", blocksize: int = 64) -> BlockFormat:
    """bitsandbytes' blockwise NF4 or FP4 at `blocksize` (formats.md section 1)."""
    return BlockFormat(name=f"{quant_type} blocksize {blocksize}", code=get_code(quant_type), blocksize=blocksize)


def double_quant_error(x: torch.Tensor, q: Any) -> torch.Tensor:
    """The extra error double quantization allows per block: nested absmax x DQ_SCALE_ERROR (+ float slack).

    q is (packed, QuantState) as quantize_4bit returns it.
    """
    _, state = q
    true_absmax = quantize_4bit(x, state.blocksize, state.quant_type, compress_statistics=False)[1].absmax
    s2 = state.state2
    nested = s2.absmax.repeat_interleave(s2.blocksize)[: true_absmax.numel()]
    half_gap = max_half_gap(state.code)
    return nested * DQ_SCALE_ERROR * (1 + 1e-5) + true_absmax * (half_gap * 1e-5 + 1e-7)


def minilora_pair(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> QuantizerPair:
    """minilora.quant.quantize_4bit / dequantize_4bit as a pair (q = (packed, QuantState))."""

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)

    def dequantize(q: tuple[torch.Tensor, Any]) -> torch.Tensor:
        return dequantize_4bit(*q)

    return QuantizerPair(
        name=f"minilora {quant_type}{'+dq' if double_quant else ''} blocksize {blocksize}",
        quantize=quantize,
        dequantize=dequantize,
        format=fourbit_format(quant_type, blocksize),
        extra_error=double_quant_error if double_quant else None,
        idempotent=not double_quant,
    )


def bitsandbytes_pair(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> QuantizerPair:
    """bitsandbytes.functional.quantize_4bit / dequantize_4bit (needs bitsandbytes; CPU tensors here)."""
    import bitsandbytes.functional as bnbf  # an optional reference: imported only when asked for

    def quantize(x: torch.Tensor) -> Any:
        return bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)

    def dequantize(q: Any) -> torch.Tensor:
        packed, state = q
        return bnbf.dequantize_4bit(packed, state)

    return QuantizerPair(
        name=f"bitsandbytes {quant_type}{'+dq' if double_quant else ''} blocksize {blocksize}",
        quantize=quantize,
        dequantize=dequantize,
        format=fourbit_format(quant_type, blocksize),
        idempotent=not double_quant,
    )


__all__ = [
    "DQ_SCALE_ERROR",
    "bitsandbytes_pair",
    "double_quant_error",
    "fourbit_format",
    "max_half_gap",
    "minilora_pair",
]
