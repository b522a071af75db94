"""PEFT adapter files, both ways: `adapter_config.json` + `adapter_model.safetensors` (formats.md s. 5).

Saved keys carry no adapter name and a `base_model.model.` prefix:
    base_model.model.<module path>.lora_A.weight          [r, in]   (adapter dtype, float32 by default)
    base_model.model.<module path>.lora_B.weight          [out, r]
    base_model.model.<module path>.lora_magnitude_vector  [out]     (DoRA only; no ".weight")
with safetensors metadata {"format": "pt"}. The config is peft 0.21's JSON (sorted keys, indent 2).

Reading refuses what peft only warns about: a targeted module whose tensors are missing, a tensor of the
wrong shape, or a tensor for a module the config does not target. Every error names the keys.
Both files are written atomically (temp file in the same directory, fsync, os.replace).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from minilora.io.checkpoint import atomic_write_bytes
from minilora.lora.api import _configs, add_lora, lora_layers
from minilora.lora.config import LoRAConfig
from minilora.lora.targeting import find_targets, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under peft's saved names (no adapter name in the keys)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        name = adapter_name or layer.active_adapter
        if name not in layer.lora_A:
            continue
        prefix = f"{KEY_PREFIX}{path}."
        out[prefix + "lora_A.weight"] = layer.lora_A[name].weight
        out[prefix + "lora_B.weight"] = layer.lora_B[name].weight
        if name in layer.lora_magnitude_vector:
            out[prefix + "lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
    return out


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter `adapter_name` (default: the active one) as peft would; returns the directory.

    base_model_name_or_path (a directory or hub id; default: the adapter config's, else the model's
    ``config.name_or_path``) is what ``PeftModel.from_pretrained`` users load the base from.
    """
    configs = _configs(model)
    layers = lora_layers(model)
    if not layers or not configs:
        raise ValueError("the model has no LoRA adapter to save (call add_lora or load_adapter first)")
    name = adapter_name or layers[0][1].active_adapter
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}")
    config = configs[name]
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in adapter_state_dict(model, name).items()}
    resolved = [path for path, layer in layers if name in layer.lora_A]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata={"format": "pt"}))
    data = config.to_peft_dict(resolved_targets=resolved)
    data["inference_mode"] = True  # peft's save_pretrained always records the saved adapter as inference-only
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write_bytes(directory / CONFIG_NAME, text.encode("utf-8"))
    return directory


def write_model_card(
    directory: str | os.PathLike,
    base_model: str | None,
    training: dict[str, Any],
    metrics: dict[str, Any],
    title: str = "LoRA adapter trained with minilora",
) -> Path:
    """README.md beside the adapter, as the hub shows it: peft's front matter (base_model, library_name)
    then the training configuration and the final metrics, and how to load it."""
    lines = ["---"] + ([f"base_model: {json.dumps(base_model)}"] if base_model else [])
    lines += ["library_name: peft", "tags:", "- lora", "- minilora", "---", ""]
    lines += [f"# {title}", ""]
    if base_model:
        lines += [f"Base model: `{base_model}`.", ""]
    lines += ["## Training configuration", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in training.items()]
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
    ]
    lines += ["", f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model or 'BASE')})"]
    lines += ['model = PeftModel.from_pretrained(base, "path/to/this/adapter")', "```", ""]
    lines += ['or `minilora generate BASE --adapter path/to/this/adapter "PROMPT"`.', ""]
    path = Path(directory) / "README.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no adapter config found")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return LoRAConfig.from_peft_dict(data, source=str(path))


def expected_adapter_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The saved key -> shape that `config` implies on `model` (before any adapter is added)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        r = int(pattern_value(config.rank_pattern, path, config.r))
        prefix = f"{KEY_PREFIX}{path}."
        shapes[prefix + "lora_A.weight"] = (r, module.in_features)
        shapes[prefix + "lora_B.weight"] = (module.out_features, r)
        if config.use_dora:
            shapes[prefix + "lora_magnitude_vector"] = (module.out_features,)
    return shapes


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
) -> nn.Module:
    """Add the adapter stored in `directory` (peft or minilora files) to `model` under `adapter_name`.

    The config's target_modules may hold suffixes or full paths. As with peft's
    `PeftModel.from_pretrained`, the adapter is frozen unless `trainable=True`. The first adapter loaded
    becomes active; a later one is added beside it (switch with `set_adapter`).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    config.inference_mode = not trainable
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: adapter weights not found (only safetensors is read)")
    tensors = load_file(str(weights_path))

    expected = expected_adapter_shapes(model, config)
    if not expected:
        raise ValueError(f"{directory}: target_modules={config.target_modules!r} matched no Linear of the model")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{key}: file {tuple(tensors[key].shape)}, model expects {shape}"
        for key, shape in expected.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"tensors for modules the config does not target on this model {unexpected}")
    if misshaped:
        problems.append(f"wrong shapes {misshaped}")
    if problems:
        raise ValueError(f"{weights_path} does not fit the model: " + "; ".join(problems))

    add_lora(model, config=config, adapter_name=adapter_name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if adapter_name not in layer.lora_A:
                continue
            prefix = f"{KEY_PREFIX}{path}."
            layer.lora_A[adapter_name].weight.copy_(tensors[prefix + "lora_A.weight"])
            layer.lora_B[adapter_name].weight.copy_(tensors[prefix + "lora_B.weight"])
            if config.use_dora:
                layer.lora_magnitude_vector[adapter_name].copy_(tensors[prefix + "lora_magnitude_vector"])
    return model
