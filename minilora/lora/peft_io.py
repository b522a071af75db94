"""PEFT adapter files, both ways: `adapter_config.json` + `adapter_model.safetensors` (formats.md s. 5).

Saved keys carry no adapter name and a `base_model.model.` prefix:
    base_model.model.<module path>.lora_A.weight          [r, in]   (adapter dtype, float32 by default)
    base_model.model.<module path>.lora_B.weight          [out, r]
    base_model.model.<module path>.lora_magnitude_vector  [out]     (DoRA only; no ".weight")
with safetensors metadata {"format": "pt"}. The config is peft 0.21's JSON (sorted keys, indent 2).

Reading refuses what peft only warns about: a targeted module whose tensors are missing, a tensor of the
wrong shape, or a tensor for a module the config does not target. Every error names the keys.
Both files are written under temporary names and renamed together once both are whole (staged_files), so
a failure half-way leaves an older adapter in the directory byte-identical.

Loading checks every file before the model changes (AdapterError naming the file, and the key or field):
adapter_config.json must be a JSON object peft could have written; a zero or non-finite scale
(lora_alpha / alpha_pattern) is refused, since the adapter would be a silent no-op; every tensor must be
floating point (an integer tensor would be cast to float without a word) and finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from minilora.errors import AdapterError
from minilora.io.safe_write import atomic_write_bytes, staged_files, write_bytes
from minilora.lora.api import _configs, add_lora, lora_layers
from minilora.lora.config import LoRAConfig
from minilora.lora.extras import ModulesToSave, extra_modules, save_targets, token_targets
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
    for path, module in extra_modules(model):  # modules_to_save, trainable tokens (lora/extras.py)
        name = adapter_name or module.active_adapter
        out.update({f"{KEY_PREFIX}{path}.{key}": t for key, t in module.saved_tensors(name).items()})
    return out


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    initial_adapter_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter `adapter_name` (default: the active one) as peft would; returns the directory.

    initial_adapter_dir (peft's `path_initial_model_for_weight_conversion`): where the adapter of a
    PiSSA / OLoRA / LoftQ init was saved before training. The adapter is then written as a plain LoRA on
    the ORIGINAL base weight (lora/init.py): W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0],
    rank 2r, alpha doubled (times sqrt 2 with rsLoRA) so that s is unchanged.

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
    if initial_adapter_dir is not None:
        tensors, config = _as_plain_lora(tensors, config, Path(initial_adapter_dir))
    directory.mkdir(parents=True, exist_ok=True)
    data = config.to_peft_dict(resolved_targets=resolved)
    data["inference_mode"] = True  # peft's save_pretrained always records the saved adapter as inference-only
    text = json.dumps(data, indent=2, sort_keys=True)
    with staged_files(directory) as stage:  # both files renamed only once both are whole
        write_bytes(stage(WEIGHTS_NAME), safetensors_bytes(tensors, metadata={"format": "pt"}))
        write_bytes(stage(CONFIG_NAME), text.encode("utf-8"))
    return directory


def _as_plain_lora(
    tensors: dict[str, torch.Tensor], config: LoRAConfig, initial_dir: Path
) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """[A ; A0] and [B | -B0] with r, alpha and the patterns doubled: peft's `subtract_mutated_init`."""
    path = initial_dir / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: the initial adapter to convert from is missing")
    initial = load_file(str(path))
    if initial.keys() != tensors.keys():
        raise AdapterError(
            f"{path}: its keys differ from the adapter being saved "
            f"(only in file: {sorted(initial.keys() - tensors.keys())[:3]}, "
            f"only in model: {sorted(tensors.keys() - initial.keys())[:3]})"
        )
    out = {}
    for key, t in tensors.items():
        if key.endswith("lora_A.weight"):
            out[key] = torch.cat([t, initial[key].to(t.dtype)], dim=0)  # (2r, in)
        elif key.endswith("lora_B.weight"):
            out[key] = torch.cat([t, -initial[key].to(t.dtype)], dim=1)  # (out, 2r)
        else:
            raise AdapterError(f"{key}: only plain LoRA tensors can be converted (no DoRA)")
    factor = 2**0.5 if config.use_rslora else 2
    plain = dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        init="default",
        loftq_config={},
    )
    return out, plain


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
    """The LoRAConfig of an adapter directory; AdapterError naming adapter_config.json for any problem."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: no adapter config found (is {directory} an adapter directory?)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid UTF-8 JSON ({e}); expected peft's adapter_config.json") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(data).__name__}")
    try:
        config = LoRAConfig.from_peft_dict(data, source=str(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, AdapterError):
            raise
        text = str(e)
        raise AdapterError(text if text.startswith(str(path)) else f"{path}: {text}") from e
    _check_scales(config, path)
    return config


def _check_scales(config: LoRAConfig, path: Path) -> None:
    """A zero scale makes the adapter a no-op that looks loaded; NaN/Inf would poison every output."""
    alphas = {"lora_alpha": config.alpha} | {f"alpha_pattern[{k!r}]": v for k, v in config.alpha_pattern.items()}
    for field, value in alphas.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise AdapterError(f"{path}: {field}={value!r} is not a number")
        if not math.isfinite(value) or value == 0:
            raise AdapterError(
                f"{path}: {field}={value!r} gives the adapter a scale of {value}/r, so it would "
                + ("change nothing" if value == 0 else "make every output NaN")
                + "; set a non-zero finite lora_alpha (peft's default is 8)"
            )


def read_adapter_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, each checked: safetensors readable, floating point, finite (AdapterError)."""
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: adapter weights not found (only safetensors is read)")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path} is not a valid safetensors file (truncated or corrupted?): {e}") from e
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(
                f"{weights_path}: key {key!r} is {t.dtype}; LoRA weights must be floating point "
                "(an integer tensor would be cast to float and give a wrong adapter)"
            )
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(
                f"{weights_path}: key {key!r} holds {bad} non-finite value(s) (NaN/Inf) among {t.numel()}; "
                "the adapter comes from a diverged or corrupted run"
            )
    return tensors


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
    for path in save_targets(model, config.modules_to_save):
        module = model.get_submodule(path)
        own = module.expected_shapes() if isinstance(module, ModulesToSave) else module.state_dict()
        shapes.update({f"{KEY_PREFIX}{path}.{k}": tuple(getattr(v, "shape", v)) for k, v in own.items()})
    for path, indices in token_targets(model, config.trainable_token_indices).items():
        dim = model.get_submodule(path).weight.shape[1]
        shapes[f"{KEY_PREFIX}{path}.token_adapter.trainable_tokens_delta"] = (len(indices), dim)
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
    tensors = read_adapter_tensors(weights_path)

    expected = expected_adapter_shapes(model, config)
    if not expected:
        raise AdapterError(
            f"{directory / CONFIG_NAME}: target_modules={config.target_modules!r} matched no Linear of the model"
        )
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
        raise AdapterError(f"{weights_path} does not fit the model: " + "; ".join(problems))

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
    for path, module in extra_modules(model):
        prefix = f"{KEY_PREFIX}{path}."
        own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        if own and module.adapter_parameters(adapter_name):
            module.load_tensors(adapter_name, own)
    return model
