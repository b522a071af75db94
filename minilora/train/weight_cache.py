"""An opt-in speed/memory trade for quantized bases: dequantize each frozen weight once, not every pass.

A QLoRA base layer (minilora.quant.Linear4bit / Linear8bit) rebuilds its float weight from the packed
codes in every forward and again in the backward (QLoRA section 3), so the model's memory stays at
~4 bits per weight. On a small CPU that rebuild costs as much as the matmul itself. The base is frozen,
so the rebuilt weight is the same every time: inside ``cached_dequantize(model)`` each quantized layer's
``dequantize`` returns a copy made once on entry.

The numbers are exactly those of the uncached path (the same ``dequantize`` output feeds the same
matmul): losses, gradients and generated tokens are bit-identical. The price is memory: the float
copies of the base weights (e.g. ~212 MB in bf16 for SmolLM2-135M) live for the duration of the block,
which gives up QLoRA's memory saving while they do. Off by default in the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _is_quantized(module: nn.Module) -> bool:
    from minilora.lora.layer import is_quantized_linear

    return is_quantized_linear(module)


@contextmanager
def cached_dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[int]:
    """Within the block every quantized Linear reuses one dequantized weight; yields the cache's bytes.

    dtype: of the cached weights (default: each layer's compute dtype, else the dtype it was quantized
    from). A layer asked for another dtype casts the cached copy.
    """
    patched: list[nn.Module] = []
    nbytes = 0
    try:
        for module in model.modules():
            if not _is_quantized(module) or "dequantize" in module.__dict__:
                continue
            want = dtype or getattr(module, "compute_dtype", None)
            with torch.no_grad():
                weight = module.dequantize(want) if want is not None else module.dequantize()
            nbytes += weight.numel() * weight.element_size()

            def cached(
                dtype: torch.dtype | None = None, *, scratch: bool = False, _w: torch.Tensor = weight
            ) -> torch.Tensor:
                # scratch asks for a value used at once; the cached weight outlives that, so it serves as is
                return _w if dtype is None or dtype == _w.dtype else _w.to(dtype)

            module.dequantize = cached  # instance attribute shadows the class method
            patched.append(module)
        yield nbytes
    finally:
        for module in patched:
            del module.dequantize
