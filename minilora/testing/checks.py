"""Property checks for any blockwise quantize/dequantize pair (torch only; hypothesis is not needed here).

A quantizer under test is a :class:`QuantizerPair`: a ``quantize(x) -> q`` (anything: packed bytes and a
state, a tuple, an object) and a ``dequantize(q) -> tensor``, plus the :class:`BlockFormat` it claims to
implement (its code table and blocksize). Each check runs one round trip and raises
:class:`QuantCheckFailure` (an ``AssertionError``) naming the first offending block, its elements, the
value that broke the property and the bound it broke, so that a shrunk hypothesis counterexample reads
as a diagnosis:

    check_shape_and_dtype   dequantize(quantize(x)) has x's shape and dtype
    check_error_bound       every element is within its block's stated bound:
                                |y - x| <= absmax_block * max_half_gap(code) (+ the pair's extra error)
    check_idempotent        quantize∘dequantize is a projection: y' = deq(q(y)) equals y = deq(q(x))
    check_agrees_with       y agrees with a reference pair's round trip within atol + rtol * |y_ref|
    check_all               all of the above

The bound is the one the format states (QLoRA section 3): a value is replaced by the nearest of the
scaled codes, so it moves by at most half the widest gap between neighbouring codes, times the block's
absmax. Two additions keep it exact for bitsandbytes' own format: a block whose absmax lies below
``absmax_floor`` (1e-38 in bitsandbytes, whose scale is clamped there: subnormal blocks) may be off by up
to its absmax, and a 16-bit output dtype adds its rounding (eps x |y|).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class QuantCheckFailure(AssertionError):
    """A quantizer broke a property; the message names the pair, the block, the element and the bound."""


def max_half_gap(code: torch.Tensor) -> float:
    """Half the widest gap between neighbouring values of a code table (in value order)."""
    ordered = code.float().sort().values
    return float((ordered[1:] - ordered[:-1]).max()) / 2


@dataclass(frozen=True)
class BlockFormat:
    """What a blockwise format promises: a code table in [-1, 1] scaled by each block's absmax.

    absmax_floor: the smallest scale the quantizer divides by (bitsandbytes clamps at 1e-38); blocks with a
    smaller absmax (subnormal values) are only promised |y - x| <= absmax.
    rtol: relative slack on the bound for float rounding of x / absmax.
    """

    name: str
    code: torch.Tensor
    blocksize: int
    absmax_floor: float = 1e-38
    rtol: float = 1e-6

    @property
    def max_half_gap(self) -> float:
        """Half the widest gap between neighbouring codes (in value order): the largest rounding step."""
        return max_half_gap(self.code)

    def block_absmax(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| of each block of the flattened tensor (the last block may be partial), float32."""
        flat = x.detach().reshape(-1).float()
        pad = (-flat.numel()) % self.blocksize
        blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, self.blocksize)  # (n_blocks, blocksize)
        return blocks.amax(dim=1)

    def block_bound(self, x: torch.Tensor) -> torch.Tensor:
        """The round-trip error each block of x may show, (n_blocks,) float32."""
        absmax = self.block_absmax(x)
        rounding = absmax * self.max_half_gap * (1 + self.rtol)
        return torch.where(absmax >= self.absmax_floor, rounding, absmax)


@dataclass(frozen=True)
class QuantizerPair:
    """A quantizer under test.

    extra_error(x, q) -> (n_blocks,) float32: error the format allows beyond rounding to the code, per block
    (e.g. double quantization stores each absmax approximately). None: no extra error.
    idempotent: whether the pair promises deq(q(deq(q(x)))) == deq(q(x)); double quantization does not (the
    stored absmax of the dequantized tensor is rounded to the 8-bit code once more), so check_all skips it.
    """

    name: str
    quantize: Callable[[torch.Tensor], Any]
    dequantize: Callable[[Any], torch.Tensor]
    format: BlockFormat
    extra_error: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    idempotent: bool = True

    def round_trip(self, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        q = self.quantize(x)
        return q, self.dequantize(q)


# ---------------------------------------------------------------------------------------------- helpers
def _describe_block(n: int, blocksize: int, block: int) -> str:
    start, stop = block * blocksize, min(n, (block + 1) * blocksize)
    last = " (the partial last block)" if stop - start < blocksize else " (the last block)" if stop == n else ""
    return f"block {block}{last}: elements {start}..{stop - 1} of {n}, blocksize {blocksize}"


def _fail(pair: QuantizerPair, what: str, x: torch.Tensor, y: torch.Tensor, index: int, detail: str) -> None:
    block = index // pair.format.blocksize
    xv, yv = float(x.reshape(-1)[index]), float(y.reshape(-1)[index])
    raise QuantCheckFailure(
        f"{pair.name}: {what} in {_describe_block(x.numel(), pair.format.blocksize, block)}; element {index} "
        f"x={xv!r} -> {yv!r}; {detail}"
    )


def _first(mask: torch.Tensor) -> int:
    return int(mask.reshape(-1).nonzero()[0, 0])


# ---------------------------------------------------------------------------------------------- checks
def check_shape_and_dtype(pair: QuantizerPair, x: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(x)) keeps x's shape and dtype; returns it."""
    _, y = pair.round_trip(x)
    if not isinstance(y, torch.Tensor):
        raise QuantCheckFailure(f"{pair.name}: dequantize returned {type(y).__name__}, not a tensor")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise QuantCheckFailure(
            f"{pair.name}: round trip of shape {list(x.shape)} {x.dtype} came back as {list(y.shape)} {y.dtype}"
        )
    return y


def error_bound(pair: QuantizerPair, x: torch.Tensor, q: Any, y: torch.Tensor) -> torch.Tensor:
    """The per-element bound of check_error_bound (float32, flat)."""
    fmt = pair.format
    bound = fmt.block_bound(x)
    if pair.extra_error is not None:
        bound = bound + pair.extra_error(x, q).float()
    per_element = bound.repeat_interleave(fmt.blocksize)[: x.numel()]
    if y.dtype != torch.float32:  # the cast of code * absmax to a 16-bit dtype rounds once more
        per_element = per_element + torch.finfo(y.dtype).eps * y.detach().reshape(-1).float().abs()
    return per_element


def check_error_bound(pair: QuantizerPair, x: torch.Tensor) -> None:
    """|dequantize(quantize(x)) - x| <= the format's bound, element by element (see module docstring)."""
    q, y = pair.round_trip(x)
    error = (y.detach().reshape(-1).float() - x.detach().reshape(-1).float()).abs()
    bound = error_bound(pair, x, q, y)
    bad = ~(error <= bound)  # NaN errors count as failures
    if bool(bad.any()):
        i = _first(bad)
        absmax = float(pair.format.block_absmax(x)[i // pair.format.blocksize])
        _fail(
            pair,
            "round-trip error over the bound",
            x,
            y,
            i,
            f"error {float(error[i]):.6g} > bound {float(bound[i]):.6g} "
            f"(block absmax {absmax:.6g} x max half-gap {pair.format.max_half_gap:.6g} of {pair.format.name})",
        )


def check_idempotent(pair: QuantizerPair, x: torch.Tensor) -> None:
    """Quantizing the dequantized tensor again changes nothing: deq(q(deq(q(x)))) == deq(q(x)), bit for bit.

    Blocks whose absmax is below the format's absmax_floor are exempt: their scale is clamped, so a value
    there moves at every round trip (bitsandbytes does the same).
    """
    _, y = pair.round_trip(x)
    _, y2 = pair.round_trip(y)
    if y2.shape != y.shape or y2.dtype != y.dtype:
        raise QuantCheckFailure(f"{pair.name}: second round trip changed {list(y.shape)} {y.dtype} to {y2.dtype}")
    fmt = pair.format
    exempt = (fmt.block_absmax(x) < fmt.absmax_floor).repeat_interleave(fmt.blocksize)[: x.numel()]
    same = (y2 == y) | (y2.isnan() & y.isnan())
    differ = ~(same.reshape(-1) | exempt)
    if bool(differ.any()):
        i = _first(differ)
        _fail(pair, "quantize∘dequantize is not idempotent", y, y2, i, "a second round trip moved this value")


def check_agrees_with(
    pair: QuantizerPair, reference: QuantizerPair, x: torch.Tensor, atol: float = 0.0, rtol: float = 0.0
) -> None:
    """The round trip equals the reference's within |y - y_ref| <= atol + rtol * |y_ref| (0, 0: bit for bit)."""
    _, y = pair.round_trip(x)
    _, ref = reference.round_trip(x)
    y32, ref32 = y.detach().reshape(-1).float(), ref.detach().reshape(-1).float()
    bad = ~((y32 - ref32).abs() <= atol + rtol * ref32.abs())
    if bool(bad.any()):
        i = _first(bad)
        _fail(
            pair,
            f"disagrees with {reference.name}",
            x,
            y,
            i,
            f"the reference gives {float(ref32[i])!r} (atol {atol:g}, rtol {rtol:g})",
        )


def check_all(pair: QuantizerPair, x: torch.Tensor, reference: QuantizerPair | None = None, **tol: float) -> None:
    """Every check above on one input (check_idempotent when the pair promises it, check_agrees_with when a
    reference is given)."""
    check_shape_and_dtype(pair, x)
    check_error_bound(pair, x)
    if pair.idempotent:
        check_idempotent(pair, x)
    if reference is not None:
        check_agrees_with(pair, reference, x, **tol)
