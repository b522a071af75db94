"""minilora.kernels: the GPU fast path. Triton kernels, each proven equal to its reference in minilora.quant.

    dequant.py   NF4/FP4 dequantize (+ double quant), bit-identical to quant.dequantize_4bit
    matmul.py    4-bit linear: fused dequant-matmul kernel (decode and training tiles), its autograd
                 function (backward: grad_input against the same packed weight)
    dispatch.py  fast path only on CUDA with Triton; `use_reference(True)` or MINILORA_REFERENCE=1
                 forces the plain-PyTorch reference everywhere

Triton is imported only when a kernel runs on a CUDA tensor; on CPU nothing here needs it.
"""

from __future__ import annotations

import torch

from .dispatch import reference_forced, reference_mode, triton_available, use_fast_path, use_reference


def dequantize_4bit(packed: torch.Tensor, state: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`minilora.quant.dequantize_4bit`, by the Triton kernel on CUDA and the reference elsewhere."""
    if use_fast_path(packed):
        from .dequant import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state, dtype)  # type: ignore[arg-type]
    from ..quant.blockwise import dequantize_4bit as reference

    return reference(packed, state, dtype)  # type: ignore[arg-type]


__all__ = [
    "dequantize_4bit",
    "reference_forced",
    "reference_mode",
    "triton_available",
    "use_fast_path",
    "use_reference",
]
