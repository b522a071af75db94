"""Shared test set-up: deterministic torch, few threads, GPU tests skipped without CUDA, a tiny HF Llama."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A random Llama small enough for every CPU test, with the byte tokenizer's vocabulary (256 bytes + 3 specials).
HF_TINY_LLAMA = dict(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


@pytest.fixture(scope="session")
def hf_tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_TINY_LLAMA built by transformers (seed 0) and written with its `save_pretrained`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf_tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**HF_TINY_LLAMA)).save_pretrained(path)
    return path
