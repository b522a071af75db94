"""An opt-in speed/memory trade for quantized bases: dequantize each frozen weight once, not every pass.

A QLoRA base layer (minilora.nn.Linear4bit / Linear8bit) rebuilds its float weight from the packed codes in
every forward and again in the backward (QLoRA section 3), so the model's memory stays at ~4 bits per weight.
On a small CPU that rebuild costs as much as the matmul itself. The base is frozen, so the rebuilt weight is
the same every time: inside ``cached_dequantize(model)`` each quantized layer's ``cached_weight`` holds a copy
made once on entry, and its matmul reads it on every path (kernels.linear_4bit: CPU and CUDA, forward and
backward; an 8-bit layer keeps LLM.int8's int8 product in the forward and reads the copy in the backward).

The numbers are those of the uncached path (the same dequantized weight feeds the same matmul): losses,
gradients and generated tokens are bit-identical, except on CUDA for a few rows at a time (decode), where the
uncached path's GEMV kernel sums in another order (within bf16 rounding). The price is memory: the float
copies of the base weights (e.g. ~212 MB in bf16 for SmolLM2-135M) live for the duration of the block, which
gives up QLoRA's memory saving while they do. Off by default in the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from minilora.nn import QuantizedLinear


@contextmanager
def cached_dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Within the block every quantized Linear reuses one dequantized weight; yields the cache's bytes.

    dtype: of the cached weights (default: each layer's compute dtype, else the dtype it was quantized
    from). A layer computing in another dtype casts the cached copy.
    """
    patched: list[QuantizedLinear] = []
    nbytes = 0
    try:
        for module in model.modules():
            if not isinstance(module, QuantizedLinear) or module.cached_weight is not None:
                continue
            with torch.no_grad():
                weight = module.dequantize(dtype or module.compute_dtype)
            nbytes += weight.numel() * weight.element_size()
            module.cached_weight = weight  # an instance attribute over the class's None
            patched.append(module)
        yield nbytes
    finally:
        for module in patched:
            del module.cached_weight
