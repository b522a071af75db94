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
    """Element counts: small ones, odd ones, whole blocks and one element either side of a block edge."""
    edge = st.builds(
        lambda k, d: max(1, min(max_length, k * blocksize + d)),
        st.integers(1, max(1, max_length // blocksize)),
        st.sampled_from([0, 1, -1, 2]),
    )
    return st.one_of(st.integers(1, max_length), edge)


def _normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen)


def _build(kind: str, n: int, seed: int, scale: float, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """A float32 tensor of n elements of `kind` that is representable (finite) in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    x = _normal(n, gen) * scale
    if kind == "heavy_tailed":
        exponential = -torch.rand(n, generator=gen).clamp(1e-7, 1 - 1e-7).log()
        x = _normal(n, gen) / exponential.sqrt() * scale
    elif kind == "outliers":
        k = min(n, 1 + seed % 3)
        where = torch.randperm(n, generator=gen)[:k]
        x[where] = (20 + 80 * torch.rand(k, generator=gen)) * scale * torch.sign(torch.randn(k, generator=gen))
    elif kind == "zero_blocks":
        n_blocks = -(-n // blocksize)
        zero = torch.rand(n_blocks, generator=gen) < 0.5
        x = x * (~zero).repeat_interleave(blocksize)[:n]
    elif kind == "subnormal":
        tiny = _normal(n, gen) * info.tiny * 0.25  # below the smallest normal number of the dtype
        n_blocks = -(-n // blocksize)
        all_tiny = (torch.rand(n_blocks, generator=gen) < 0.5).repeat_interleave(blocksize)[:n]
        x = torch.where(all_tiny | (torch.rand(n, generator=gen) < 0.3), tiny, x)
    elif kind == "huge":
        x = (_normal(n, gen) / 4).clamp(-1, 1) * info.max
        x[int(torch.randint(n, (1,), generator=gen))] = info.max * (1 if seed % 2 else -1)
    return x.clamp(-info.max, info.max).to(dtype)


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
        x = _build(kind, n, seed, scale, dtype, blocksize)
    if two_d and x.numel() > 1 and draw(st.booleans()):
        rows = draw(st.sampled_from([d for d in (2, 3, 4, 8) if x.numel() % d == 0] or [1]))
        x = x.view(rows, -1)  # (rows, n / rows): blocks then span rows, as in a real weight
    return x


__all__ = ["KINDS", "SCALES", "blocksizes", "float_dtypes", "lengths", "quant_types", "weights"]
