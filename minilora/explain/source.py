"""Where `minilora explain` reads a model from: its config and one weight at a time, never the whole model.

    open_model("default")            the shipped SmolLM2-135M-Instruct GGUF, read in place (no conversion)
    open_model("model.gguf")         any Llama-family GGUF file, likewise
    open_model("dir/")               a transformers directory (config.json + safetensors), or a hub id
    open_model("config.json")        a config alone: `lora` and `model` need no weights

A GGUF weight is dequantized on demand and its q/k rows un-permuted (minilora/io/gguf.py), so a key is the
transformers name (`model.layers.0.self_attn.q_proj.weight`) whatever the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minilora.errors import CheckpointError
from minilora.models.config import ModelConfig

DEFAULT_WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@dataclass
class ModelSource:
    """A model's config and lazy access to its weights by transformers name."""

    name: str
    config: ModelConfig
    keys: list[str] = field(default_factory=list)
    _read: Callable[[str], torch.Tensor] | None = None

    def weight(self, key: str = DEFAULT_WEIGHT) -> torch.Tensor:
        """The float32 tensor `key`; a CheckpointError naming the source and similar keys if it has none."""
        if self._read is None:
            raise CheckpointError(f"{self.name}: a config alone has no weights (asked for {key!r})")
        if key not in self.keys:
            near = [k for k in self.keys if key.rsplit(".", 2)[-2] in k][:4] or self.keys[:4]
            raise CheckpointError(f"{self.name}: no tensor {key!r}; it has e.g. {near}")
        return self._read(key).float()


def _from_gguf(path: Path) -> ModelSource:
    from minilora.io.gguf import hf_name, llama_config, read_gguf, unpermute_qk

    gf = read_gguf(path)
    config = llama_config(gf)
    names = {hf_name(name, path): name for name in gf.tensors}

    def read(key: str) -> torch.Tensor:
        w = gf.tensor(names[key])
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        return w

    return ModelSource(str(path), ModelConfig.from_dict(config, source=str(path)), sorted(names), read)


def _from_checkpoint(directory: Path) -> ModelSource:
    from minilora.io.checkpoint import CheckpointReader

    config = ModelConfig.from_json(directory)
    reader = CheckpointReader(directory)
    return ModelSource(str(directory), config, sorted(reader.keys()), reader.get)


def open_model(ref: str | os.PathLike | None = "default") -> ModelSource:
    """A ModelSource for "default", a .gguf file, a transformers directory, a config.json or a hub id."""
    ref = "default" if ref in (None, "") else os.fspath(ref)
    if ref == "default":
        from minilora.io.gguf import default_model_path

        return _from_gguf(default_model_path())
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        return _from_gguf(path)
    if path.is_file() and path.suffix == ".json":
        return ModelSource(str(path), ModelConfig.from_json(path))
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            return ModelSource(str(path), ModelConfig.from_json(path))
        return _from_checkpoint(path)
    from minilora.io.hub import resolve_model_dir

    return _from_checkpoint(resolve_model_dir(ref))
