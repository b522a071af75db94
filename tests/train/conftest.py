"""Fixtures for the training tests: a tiny random Llama checkpoint and the byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from minilora.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def byte_tok():
    from minilora.testing.tiny import byte_tokenizer

    return byte_tokenizer()
