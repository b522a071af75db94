"""The code tables ("codebooks") of 4-bit NF4/FP4 and of the 8-bit dynamic type.

A blockwise quantizer (QLoRA paper, Dettmers et al. 2023, section 3) stores, for every weight, the index
of the nearest entry of a small table of values in [-1, 1]; the table is the data type.

- NF4 (section 3, "4-bit NormalFloat"): pretrained weights are close to N(0, sigma). If every one of the
  16 codes covers an equal share of the probability mass of N(0, 1), every code is used equally often and
  no bit is wasted. The codes are the midpoints (in probability) of equal-probability bins, obtained with
  the inverse normal CDF. To keep an exact zero (padding, zero weights) the table is asymmetric: 8
  positive quantiles, 7 negative ones and 0, normalised so the largest magnitude is 1.
- FP4: 1 sign bit, 2 exponent bits, 1 mantissa bit, exponent bias 2 (bitsandbytes' variant). The index
  IS the bit pattern, so the table is not sorted by value.
- The signed 8-bit "dynamic" type (Dettmers 2015, "8-bit approximations"): a sign bit, a run of zeros
  that sets a decimal exponent 10^-6 .. 10^0, then linear fraction bits. Double quantization (section
  3, "Double Quantization") stores each block's absmax with it.

Bit budget: 4 bits a weight for NF4/FP4 (a table of 16 float32 values per tensor, 64 bytes).
"""

from __future__ import annotations

import functools

import torch

# The NF4 table bitsandbytes and the QLoRA paper (appendix E) publish, as float32. `derive_nf4_code`
# recomputes it from normal quantiles; a test proves the two agree to 1.2e-7.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Where the outermost quantile sits: (1 - 0.9677083) of the mass lies beyond the largest code. Chosen in
# the QLoRA reference code so that the extreme codes are not wasted on the tails.
NF4_OFFSET = 0.9677083


def derive_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4 from first principles: the quantiles of N(0, 1) at equally spaced probabilities.

    8 positive values at probabilities linspace(offset, 0.5, 9)[:-1], 7 negative ones at
    linspace(offset, 0.5, 8)[:-1], plus an exact 0; sorted and divided by the largest.

    >>> derive_nf4_code()[[0, 7, 15]].tolist()
    [-1.0, 0.0, 1.0]
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).to(torch.float32)


def derive_fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) in bit-pattern order: index = sign<<3 | exponent<<1 | mantissa.

    Exponent field 0 is subnormal: magnitude = mantissa * 0.0625. A field e in 1..3 gives
    (1 + mantissa/2) * 2^(4 - e), so larger fields mean SMALLER values in this layout (8, 4, 2 for
    e = 1, 2, 3). Scaled by 1/12 so that the table spans [-1, 1]: [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12,
    then the same negated for sign bit 1 (index 8 holds +0.0, as in bitsandbytes' table).
    """
    magnitudes = []
    for bits in range(8):
        exponent, mantissa = bits >> 1, bits & 1
        if exponent == 0:
            magnitudes.append(mantissa * 0.0625)
        else:
            magnitudes.append((1 + mantissa / 2) * 2.0 ** (4 - exponent))
    code = torch.tensor(magnitudes, dtype=torch.float32)
    code = torch.cat([code, -code]) / code.abs().max()
    return code + 0.0  # -0.0 -> +0.0


def derive_dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted float32 values, -0.99297 .. 1.0, with 0).

    For exponent e = 0..6 (decimal scale 10^(e-6)) there are 2^e linear fractions: the midpoints of
    2^e equal steps of [0.1, 1]. Positive and negative copies, plus 0 and 1.0, make 256 values.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0  # (2^e,)
        scaled = centres * (10.0 ** (e - 6))
        values += scaled.tolist() + (-scaled).tolist()
    assert len(values) == 256, f"dynamic map has {len(values)} values"
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def get_code(name: str) -> torch.Tensor:
    """The float32 table for "nf4", "fp4" or "dynamic", on the CPU (made once; callers must not modify it)."""
    derive = {"nf4": lambda: torch.tensor(NF4_CODE, dtype=torch.float32), "fp4": derive_fp4_code}
    derive["dynamic"] = derive_dynamic_code
    if name not in derive:
        raise ValueError(f"unknown code {name!r}: expected 'nf4', 'fp4' or 'dynamic'")
    return derive[name]()


# ---- nearest-code rounding (step 4 of the blockwise recipe) ---------------------------------------------


def sorted_midpoints(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision boundaries of nearest-code rounding: midpoints of the codes in value order.

    Returns (midpoints (15,), order (16,)) where order[k] is the code index of the k-th smallest code.
    A stable sort keeps equal codes (FP4's two zeros) in index order.
    """
    order = torch.sort(code, stable=True).indices
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) * 0.5, order


def nearest_code_index(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """The rank of the nearest code = how many decision boundaries lie strictly below the value.

    A value exactly on a boundary is not counted past it, so ties go to the lower code. Returns uint8.
    """
    index = (scaled > midpoints[0]).to(torch.uint8)
    for boundary in midpoints[1:]:
        index += scaled > boundary
    return index
