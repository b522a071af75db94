"""A tiny random Llama and a byte-level tokenizer: the models the tests and ``minilora demo --smoke`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with <bos>=256, <eos>=257, <pad>=258 (the smoke run's and the tests')."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from minilora.io.tokenizer import Tokenizer

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}
    return Tokenizer(tk, config)


def make_tiny_model_dir(directory: str | Path, seed: int = 0, vocab_size: int = 259) -> Path:
    """A random tiny Llama (hidden 64, 2 layers) with the byte tokenizer, in transformers format."""
    from minilora.io.checkpoint import save_pretrained
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaForCausalLM

    directory = Path(directory)
    config = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "pad_token_id": 258,
            "torch_dtype": "float32",
        }
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # transformers' initializer_range: small weights, sane logits
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, directory)
    byte_tokenizer().save(directory)
    return directory
