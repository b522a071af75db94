"""The way out: a (merged) minilora Llama as a transformers directory or as one GGUF file for llama.cpp.

    export_safetensors(model, out, tokenizer_dir=src)   config.json + model.safetensors (or shards + index)
                                                       + the tokenizer files copied from `src`
    export_gguf(model, out.gguf, "Q8_0", tokenizer=md)  llama.* hyper-parameters, tokenizer.* (vocabulary,
                                                       merges, special ids, chat template), tensors

A model that still carries LoRA adapters is merged first (merge_and_unload: quantized bases are
dequantized, so nothing is requantized on the way). In GGUF the 1-D norm weights stay F32 (llama.cpp's
convention) and q/k rows take llama.cpp's interleaved RoPE order. Every output goes through
io/safe_write.py: it may not overlap an input, and is written aside, then renamed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilora.io.checkpoint import model_tensors, save_pretrained
from minilora.io.gguf import _BLOCK_NAMES, _GLOBAL_NAMES
from minilora.io.gguf_format import read_gguf
from minilora.io.gguf_write import write_gguf
from minilora.io.safe_write import check_output, output_directory

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
GGUF_EXPORT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
_GGUF_NAME = {hf: gguf for gguf, hf in _GLOBAL_NAMES.items()}
_BLOCK_GGUF = {hf: gguf for gguf, hf in _BLOCK_NAMES.items()}


def merged(model: nn.Module) -> nn.Module:
    """The model with any LoRA adapter merged in and unloaded (in place)."""
    from minilora.lora.api import lora_layers, merge_and_unload

    return merge_and_unload(model) if lora_layers(model) else model


def export_safetensors(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | None = None,
    dtype: torch.dtype | None = None,
    inputs: list[str | os.PathLike] | None = None,
) -> Path:
    """Write the merged model as a transformers directory; `inputs` (and tokenizer_dir) must not overlap out."""
    check_output(out, [tokenizer_dir, *(inputs or [])])
    model = merged(model)
    if dtype is not None:
        model = model.to(dtype)
    with output_directory(out) as tmp:
        save_pretrained(model, tmp, max_shard_size=max_shard_size)
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
    return Path(out)


def gguf_name(hf: str) -> str:
    """transformers name -> llama.cpp name (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight)."""
    if hf in _GGUF_NAME:
        return _GGUF_NAME[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        if module in _BLOCK_GGUF:
            return f"blk.{parts[2]}.{_BLOCK_GGUF[module]}.weight"
    raise ValueError(f"tensor {hf!r} has no llama.cpp GGUF name (only Llama decoders without biases export)")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rows (0..hd/2-1 | hd/2..hd-1) per head -> llama.cpp's interleaved (0, hd/2, 1, hd/2+1, ...)."""
    out_features, in_features = w.shape
    half = out_features // n_heads // 2
    w = w.reshape(n_heads, 2, half, in_features)  # (heads, pair, hd/2, in)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (heads * hd, in), pairs interleaved


def llama_metadata(config: Any, name: str = "minilora-export") -> dict[str, Any]:
    """general.* and llama.* keys for a ModelConfig (the keys minilora.io.gguf.llama_config reads)."""
    if config.model_type != "llama" or config.rope_type not in ("default", "linear"):
        raise ValueError(
            f"GGUF export supports Llama with default/linear RoPE, got {config.model_type}/{config.rope_type}"
        )
    md: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": name,
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.attention.key_length": config.head_dim,
        "llama.attention.value_length": config.head_dim,
        "llama.rope.dimension_count": config.head_dim,
        "llama.rope.freq_base": float(config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.vocab_size": config.vocab_size,
    }
    if config.rope_type == "linear":
        md["llama.rope.scaling.type"] = "linear"
        md["llama.rope.scaling.factor"] = float(config.rope_scaling["factor"])
    for key in ("bos", "eos", "pad"):
        value = getattr(config, f"{key}_token_id")
        if isinstance(value, int):
            md[f"tokenizer.ggml.{'padding' if key == 'pad' else key}_token_id"] = value
    return md


def tokenizer_metadata_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """The tokenizer.* keys of a GGUF file (vocabulary, merges, special ids, chat template), to copy over."""
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    type_name: str = "F16",
    tokenizer: dict[str, Any] | None = None,
    chat_template: str | None = None,
    inputs: list[str | os.PathLike] | None = None,
    name: str = "minilora-export",
) -> Path:
    """Write the merged model as one GGUF file; 2-D weights in `type_name`, norms in F32."""
    if type_name not in GGUF_EXPORT_TYPES:
        raise ValueError(f"GGUF export type {type_name!r}: use one of {GGUF_EXPORT_TYPES}")
    check_output(out, inputs or [])
    model = merged(model)
    config = model.config
    metadata = llama_metadata(config, name)
    metadata.update(tokenizer or {})
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for key, w in model_tensors(model).items():
        w = w.detach().to(torch.float32)
        if key.endswith("self_attn.q_proj.weight"):
            w = permute_qk(w, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            w = permute_qk(w, config.num_key_value_heads)
        if w.dim() != 2:
            stored = "F32"
        else:
            stored = type_name if w.shape[1] % 32 == 0 or not type_name.startswith("Q") else "F16"
        tensors[gguf_name(key)] = (w, stored)
    metadata["general.file_type"] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}[type_name]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, metadata, tensors)  # atomic: written beside, then renamed
    return out
