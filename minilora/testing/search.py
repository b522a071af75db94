"""Run the checks under hypothesis: every property over every blocksize, and the shrunk counterexample.

    verify_quantizer(make_pair)          all checks on tensors from strategies.weights, every blocksize;
                                         raises QuantCheckFailure for hypothesis' shrunk example
    find_counterexample(check, strategy) the shrunk failing input and its failure, or None

`make_pair(blocksize)` builds the quantizer under test for one blocksize (and `reference(blocksize)` the
pair to agree with). Hypothesis draws (blocksize, tensor), and on a failure shrinks the tensor: fewer
elements, one dimension, smaller values; the failure message names the block that broke.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.testing.checks import QuantCheckFailure, QuantizerPair, check_all
from minilora.testing.strategies import KINDS, blocksizes, weights

# Examples are whole tensors: generation can exceed hypothesis' default size and time budgets.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


@dataclass
class Counterexample:
    """The input hypothesis shrank a failure to, and the failure it gives."""

    example: Any
    failure: QuantCheckFailure

    def __str__(self) -> str:
        return f"{self.failure}\nshrunk input: {describe_example(self.example)}"


def describe_example(example: Any) -> str:
    """A short rendering of a (blocksize, tensor) example or a tensor: shape, dtype and the first values."""
    if isinstance(example, tuple):
        return ", ".join(describe_example(e) for e in example)
    if isinstance(example, torch.Tensor):
        flat = example.reshape(-1)
        head = ", ".join(f"{float(v):.6g}" for v in flat[:8])
        more = f", ... ({flat.numel()} values)" if flat.numel() > 8 else ""
        return f"tensor{list(example.shape)} {example.dtype} [{head}{more}]"
    return repr(example)


def cases(
    kinds: tuple[str, ...] = KINDS, dtypes: tuple[torch.dtype, ...] = (torch.float32,), **kw: Any
) -> st.SearchStrategy[tuple[int, torch.Tensor]]:
    """(blocksize, weight tensor) pairs over every blocksize, the tensor's block edges at that blocksize."""
    allowed = kw.pop("blocksizes", None)
    bs = blocksizes() if allowed is None else blocksizes(tuple(allowed))
    return bs.flatmap(lambda b: st.tuples(st.just(b), weights(kinds=kinds, dtypes=dtypes, blocksize=b, **kw)))


def find_counterexample(
    check: Callable[[Any], None], strategy: st.SearchStrategy, max_examples: int = 200
) -> Counterexample | None:
    """Run `check` on up to `max_examples` draws of `strategy` (deterministically); on a QuantCheckFailure
    return the example hypothesis shrank it to (the last one it replays) with its failure, else None."""
    seen: list[Any] = []

    @settings(
        max_examples=max_examples, deadline=None, database=None, derandomize=True, suppress_health_check=_SUPPRESS
    )
    @given(strategy)
    def run(example: Any) -> None:
        seen.append(example)
        check(example)

    try:
        run()
    except QuantCheckFailure as failure:
        return Counterexample(seen[-1], failure)
    return None


def verify_quantizer(
    make_pair: Callable[[int], QuantizerPair],
    reference: Callable[[int], QuantizerPair] | None = None,
    *,
    max_examples: int = 100,
    kinds: tuple[str, ...] = KINDS,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    allowed_blocksizes: tuple[int, ...] | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> None:
    """Every check of minilora.testing on hypothesis' tensors at every blocksize; raises QuantCheckFailure
    (its message ending with the shrunk input) when one fails."""
    __tracebackhide__ = True  # pytest: show the failure, not this frame

    def check(case: tuple[int, torch.Tensor]) -> None:
        blocksize, x = case
        ref = reference(blocksize) if reference is not None else None
        check_all(make_pair(blocksize), x, ref, atol=atol, rtol=rtol)

    strategy = cases(kinds, dtypes, blocksizes=allowed_blocksizes)
    found = find_counterexample(check, strategy, max_examples)
    if found is not None:
        raise QuantCheckFailure(str(found)) from found.failure
