"""bitsandbytes' CUDA rule: how its CUDA kernels round, for bytes equal to what bitsandbytes stores on a GPU.

bitsandbytes' CUDA quantizer (built with --use_fast_math) stores a few codes that its CPU path (the rule of
blockwise.py) would not. benchmarks/gpu/rounding_probe.py counted them on random weights, and these are the
differences:
 1. the scale is x * (1 / absmax) with the GPU's approximate reciprocal (kernels/fastdiv.py), not IEEE;
    values and products below 2**-126 are flushed to zero;
 2. its decision boundaries are decimal constants in its source, each read once by the compiler as a
    float32. For NF4 they are the double-precision midpoints of the codes, printed in Python's shortest
    form: reading "0.5016634166240692" as a float32 gives the value one step below the float32 midpoint
    that the CPU path computes. For FP4 they are hand-written decimals of the midpoints (7/24 as
    0.29166667, 7/12 as 0.583333, ...): FP4_BOUNDARIES;
 3. FP4 takes the sign first (x < 0 sets bit 3) and rounds the magnitude: a small negative value gets -0
    (index 8) where the CPU's nearest-code search gives +0 (index 0), and a small positive one +0 where the
    CPU gives -0 (0.5% of the codes of a Gaussian weight; the dequantized values are equal);
 4. an all-zero block keeps absmax 0 (the CPU floors a partial last block's at 1e-38); its reciprocal is
    inf and 0 * inf is NaN, which passes no boundary: index 0 (NF4: -1.0 x 0).

These functions are the PyTorch form of that rule (`rounding="bnb_cuda"` in blockwise.py and int8.py), with
IEEE division unless the caller passes another `divide`: on an NVIDIA GPU the door (minilora.kernels) passes
the GPU's approximate division (kernels/fastdiv.py) or runs the same rule as Triton kernels (kernels/quantize.py),
tested equal to it and to bitsandbytes (tests/kernels/test_gpu_bnb_parity.py). tests/quant/test_bnb_cuda_rule.py
checks the rule on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from .codebooks import get_code, nearest_code_index

# The boundaries of FP4's positive half, as bitsandbytes' CUDA source writes them (text: read once to float32).
FP4_BOUNDARIES = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
FLT_MIN = 2.0**-126  # smallest normal float32: below it, fast-math code sees zero


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


def ieee_divide(numerator: float, den: torch.Tensor) -> torch.Tensor:
    """numerator / den, correctly rounded (float32). bitsandbytes' GPU division differs in the last bit at times,
    which moves a value sitting on a decision boundary to the next code: a few per million."""
    return numerator / den.float()


Divide = Callable[[float, torch.Tensor], torch.Tensor]


def scale_blocks(flat: torch.Tensor, blocksize: int, divide: Divide = ieee_divide) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax float32 (n_blocks,), scaled float32 (n,)) as bitsandbytes' CUDA kernel computes them: subnormal
    inputs flushed, absmax over each block's own values (0 for an all-zero block), x * divide(1, absmax) (the
    GPU's fast reciprocal when the door passes it), subnormal products flushed. An all-zero block scales to NaN
    (0 * inf)."""
    flat = flat.float()
    flat = torch.where(flat.abs() < FLT_MIN, torch.zeros_like(flat), flat)
    n = flat.numel()
    blocks = F.pad(flat, (0, (-n) % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * divide(1.0, absmax).unsqueeze(1)).reshape(-1)[:n]
    scaled = torch.where(scaled.abs() < FLT_MIN, torch.zeros_like(scaled), scaled)  # NaN stays NaN
    return absmax, scaled


@functools.cache
def boundaries(quant_type: str) -> tuple[list[float], list[int]]:
    """(boundaries, rank -> code index) of bitsandbytes' CUDA rule. NF4: the 15 boundaries over the whole
    range; FP4: the 7 boundaries of the magnitude and the indices of the positive codes in value order."""
    code = get_code(quant_type)
    if quant_type == "fp4":
        positive = torch.sort(code[:8], stable=True).indices.tolist()
        return [float32_from_decimal(t) for t in FP4_BOUNDARIES], positive
    ordered, order = torch.sort(code, stable=True)
    pairs = zip(ordered[:-1].tolist(), ordered[1:].tolist(), strict=True)
    return [float32_from_decimal(repr((a + b) / 2)) for a, b in pairs], order.tolist()


def code_index(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Step 4 by bitsandbytes' CUDA rule: uint8 code indices of scaled values (NaN -> rank 0)."""
    bounds, rank_to_index = boundaries(quant_type)
    lookup = torch.tensor(rank_to_index, dtype=torch.uint8, device=scaled.device)
    if quant_type != "fp4":
        return lookup[nearest_code_index(scaled, bounds).long()]
    magnitude = lookup[nearest_code_index(scaled.abs(), bounds).long()]
    return magnitude + (scaled < 0).to(torch.uint8) * 8


def code_index_8bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
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
