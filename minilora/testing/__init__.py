"""minilora.testing: property-test any blockwise quantizer, minilora's or your own (hypothesis optional).

    from minilora.testing import QuantizerPair, BlockFormat, check_all, minilora_pair
    from minilora.testing import strategies, verify_quantizer      # these need hypothesis

Read in this order: checks.py (the properties and their bounds) -> pairs.py (minilora's and bitsandbytes'
quantizers as pairs) -> strategies.py (the tensors that break quantizers) -> search.py (hypothesis runs,
shrunk counterexamples) -> pytest_plugin.py (fixtures). docs/testing.md walks through a broken quantizer.

The checks need torch only; `strategies`, `verify_quantizer`, `find_counterexample` and `cases` need
hypothesis (``pip install 'minilora[testing]'``) and say so when it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

from minilora.testing.checks import (
    BlockFormat,
    QuantCheckFailure,
    QuantizerPair,
    check_agrees_with,
    check_all,
    check_error_bound,
    check_idempotent,
    check_shape_and_dtype,
    error_bound,
    max_half_gap,
)
from minilora.testing.pairs import DQ_SCALE_ERROR, bitsandbytes_pair, fourbit_format, minilora_pair

_NEEDS_HYPOTHESIS = {
    "strategies": ("minilora.testing.strategies", None),
    "verify_quantizer": ("minilora.testing.search", "verify_quantizer"),
    "find_counterexample": ("minilora.testing.search", "find_counterexample"),
    "cases": ("minilora.testing.search", "cases"),
    "Counterexample": ("minilora.testing.search", "Counterexample"),
}


def __getattr__(name: str) -> Any:
    """The hypothesis-based names, imported on first use (an ImportError naming the extra if it is missing)."""
    if name not in _NEEDS_HYPOTHESIS:
        raise AttributeError(f"module 'minilora.testing' has no attribute {name!r}")
    module_name, attr = _NEEDS_HYPOTHESIS[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


__all__ = [
    "DQ_SCALE_ERROR",
    "BlockFormat",
    "Counterexample",
    "QuantCheckFailure",
    "QuantizerPair",
    "bitsandbytes_pair",
    "cases",
    "check_agrees_with",
    "check_all",
    "check_error_bound",
    "check_idempotent",
    "check_shape_and_dtype",
    "error_bound",
    "find_counterexample",
    "fourbit_format",
    "max_half_gap",
    "minilora_pair",
    "strategies",
    "verify_quantizer",
]
