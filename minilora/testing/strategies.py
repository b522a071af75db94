"""Hypothesis strategies for the weight tensors that break quantizers (needs ``pip install minilora[testing]``).

    weights()        1-D or 2-D float tensors of one of KINDS, any length (odd ones and partial blocks
                     included), any dtype of `dtypes`; they shrink towards short, 1-D, "normal" tensors
    blocksizes()     every blocksize bitsandbytes allows (32 .. 4096)
    quant_types()    "nf4" or "fp4"
    lengths(bs)      element counts that stress block edges: 1, odd, k * bs, k * bs +- 1, anything up to max

KINDS:
    normal        N(0, 1) x a scale from SCALES
    heavy_tailed  Student-t with 2 degrees of freedom (a normal over sqrt of an exponential)
    outliers      normal with 1-3 elements 20-100 x larger (the LLM.int8 outlier features)
    zero_blocks   normal with whole blocks of zeros (absmax 0: the all-zero block rule)
    subnormal     values below the smallest normal number of the dtype, some blocks entirely so
    huge          finite values up to the dtype's maximum (1/absmax is then subnormal)
    values        an explicit list of floats, which hypothesis shrinks element by element

Tensors other than "values" come from a seeded torch generator, so large tensors stay cheap to draw.
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - exercised by a subprocess test without hypothesis
    raise ImportError(
        "minilora.testing.strategies needs hypothesis: pip install 'minilora[testing]' (or pip install hypothesis); "
        "the checks in minilora.testing work without it"
    ) from e

import torch

from minilora.quant.state import QUANT_TYPES, VALID_BLOCKSIZES

KINDS = ("normal", "heavy_tailed", "outliers", "zero_blocks", "subnormal", "huge", "values")
SCALES = (1.0, 1e-4, 0.02, 300.0)
MAX_LENGTH = 3000


def blocksizes(allowed: tuple[int, ...] = VALID_BLOCKSIZES) -> st.SearchStrategy[int]:
    """Every allowed blocksize (shrinks towards the smallest)."""
    return st.sampled_from(sorted(allowed))


def quant_types() -> st.SearchStrategy[str]:
    return st.sampled_from(QUANT_TYPES)


def float_dtypes(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)) -> st.SearchStrategy:
    return st.sampled_from(dtypes)


def lengths(blocksize: int = 64, max_length: int = MAX_LENGTH) -> st.SearchStrategy[int]:
    """Element counts k * blocksize + r: whole blocks, one element past a block edge, one short of the next,
    odd counts, and anything in between. Shrinks towards 1 (k = 0, r = 1), then few blocks and a short rest."""
    rest = st.one_of(st.sampled_from([1, 0, 2, blocksize - 1]), st.integers(0, blocksize - 1))
    return st.tuples(st.integers(0, max(1, max_length // blocksize)), rest).map(
        lambda kr: min(max_length, max(1, kr[0] * blocksize + kr[1]))
    )


def _build(kind: str, n: int, seed: int, scale: float, dtype: torch.dtype, blocksize: int, size: int) -> torch.Tensor:
    """n elements of `kind`, representable (finite) in `dtype`.

    Every random draw is made for `size` (>= n) elements and cut to n, so a shorter tensor of the same seed is
    a prefix of a longer one: when hypothesis shrinks the length, the values that broke a check stay put.
    """
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    n_blocks = -(-size // blocksize)
    x = torch.randn(size, generator=gen) * scale
    if kind == "heavy_tailed":
        exponential = -torch.rand(size, generator=gen).clamp(1e-7, 1 - 1e-7).log()
        x = x / exponential.sqrt()
    elif kind == "outliers":
        k = 1 + seed % 3
        where = (torch.rand(k, generator=gen) * n).long()
        x[where] = (20 + 80 * torch.rand(k, generator=gen)) * scale * torch.sign(torch.randn(k, generator=gen))
    elif kind == "zero_blocks":
        zero = torch.rand(n_blocks, generator=gen) < 0.5
        x = x * (~zero).repeat_interleave(blocksize)[:size]
    elif kind == "subnormal":
        tiny = torch.randn(size, generator=gen) * info.tiny * 0.25  # below the smallest normal number of the dtype
        all_tiny = (torch.rand(n_blocks, generator=gen) < 0.5).repeat_interleave(blocksize)[:size]
        x = torch.where(all_tiny | (torch.rand(size, generator=gen) < 0.3), tiny, x)
    elif kind == "huge":
        x = (x / (4 * scale)).clamp(-1, 1) * info.max
        x[int(torch.rand(1, generator=gen) * n)] = info.max * (1 if seed % 2 else -1)
    return x[:n].clamp(-info.max, info.max).to(dtype)


@st.composite
def weights(
    draw: st.DrawFn,
    kinds: tuple[str, ...] = KINDS,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    blocksize: int = 64,
    max_length: int = MAX_LENGTH,
    two_d: bool = True,
    scales: tuple[float, ...] = SCALES,
) -> torch.Tensor:
    """A weight tensor of one of `kinds` (see the module docstring); `blocksize` places the all-zero and
    all-subnormal blocks and the lengths at block edges."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown weight kinds {sorted(unknown)}; known: {KINDS}")
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(dtypes))
    if kind == "values":
        width = 16 if dtype == torch.float16 else 32
        values = draw(
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False, width=width),
                min_size=1,
                max_size=min(max_length, 2 * blocksize + 3),
            )
        )
        x = torch.tensor(values, dtype=torch.float32).to(dtype)
        if not bool(torch.isfinite(x).all()):  # float32 values past bfloat16's range round to inf
            x = torch.tensor(values, dtype=torch.float32).clamp(-1e38, 1e38).to(dtype)
    else:
        n = draw(lengths(blocksize, max_length))
        seed = draw(st.integers(0, 2**31 - 1))
        scale = draw(st.sampled_from(scales))
        x = _build(kind, n, seed, scale, dtype, blocksize, max(n, max_length))
    if two_d and x.numel() > 1 and draw(st.booleans()):
        rows = draw(st.sampled_from([d for d in (2, 3, 4, 8) if x.numel() % d == 0] or [1]))
        x = x.view(rows, -1)  # (rows, n / rows): blocks then span rows, as in a real weight
    return x


__all__ = ["KINDS", "SCALES", "blocksizes", "float_dtypes", "lengths", "quant_types", "weights"]
