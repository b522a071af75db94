"""pytest fixtures for quantizer property tests. Enable in your root conftest.py:

    pytest_plugins = ["minilora.testing.pytest_plugin"]

then in a test:

    def test_my_quantizer(verify_quantizer):
        verify_quantizer(lambda blocksize: QuantizerPair("mine", my_quantize, my_dequantize, fmt(blocksize)))

Fixtures:
    verify_quantizer   minilora.testing.verify_quantizer with max_examples from --minilora-examples (default 100)
    minilora_pair      minilora.testing.minilora_pair (a factory: quant_type, blocksize, double_quant)
    quant_checks       the minilora.testing module (checks, strategies on attribute access)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--minilora-examples",
        type=int,
        default=100,
        help="hypothesis examples per verify_quantizer call (minilora.testing)",
    )


@pytest.fixture
def verify_quantizer(request: pytest.FixtureRequest) -> Callable[..., None]:
    from minilora.testing.search import verify_quantizer as verify

    try:
        examples = request.config.getoption("--minilora-examples")
    except ValueError:  # the module was imported for its fixtures, not loaded as a plugin
        examples = 100
    return functools.partial(verify, max_examples=examples)


@pytest.fixture
def minilora_pair() -> Callable[..., Any]:
    from minilora.testing import minilora_pair as factory

    return factory


@pytest.fixture
def quant_checks() -> ModuleType:
    import minilora.testing

    return minilora.testing
