"""Fixtures for the LoRA tests: a tiny random Llama saved by transformers into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.lora.lora_testutil import TINY


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path
