"""Several named adapters on one model: delete, combine (peft's add_weighted_adapter), save and load all, and
batches whose rows use different adapters (peft's `model(..., adapter_names=[...])`: `mixed_batch`).

Switching (`set_adapter`) and disabling (`disable_adapters`) are in api.py. Combining, per layer:

    linear   A' = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,   B' = sum_i sqrt|w_i s_i| B_i     (all r_i equal)
             which is NOT sum_i w_i s_i B_i A_i (cross terms B_i A_j remain): peft's definition, kept as is
    svd      D = sum_i w_i s_i B_i A_i  (the exact weighted update),  D = U S V^T,
             B' = U_k S_k,  A' = V_k^T,   k = svd_rank or max r_i (the best rank-k approximation of D)

The new adapter has r = alpha = its rank (s = 1; sqrt(r) with rsLoRA, as peft) and targets the union of
the modules. Files follow peft's layout: the adapter "default" in the directory itself, every other one
in a subdirectory named after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from minilora.errors import AdapterError
from minilora.lora.api import _configs, _update_trainable, add_lora, extra_modules, lora_layers, set_adapter
from minilora.lora.config import LoRAConfig
from minilora.lora.peft_io import CONFIG_NAME, load_adapter, save_adapter


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` everywhere; if it was active, the first remaining one becomes active."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    layers = lora_layers(model)
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise AdapterError(f"adapter {adapter_name!r} is merged into {merged[:3]}: unmerge it before deleting")
    was_active = bool(layers) and layers[0][1].active_adapter == adapter_name
    for _, layer in layers:
        if adapter_name in layer.lora_A:
            for store in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                del store[adapter_name]
            if adapter_name in layer.lora_magnitude_vector:
                del layer.lora_magnitude_vector[adapter_name]
            del layer.settings[adapter_name]
    for _, module in extra_modules(model):
        if module.adapter_parameters(adapter_name):
            module.delete_adapter(adapter_name)
    del configs[adapter_name]
    if was_active and configs:
        set_adapter(model, next(iter(configs)))
    _update_trainable(model)


def _union_targets(configs: list[LoRAConfig]) -> list[str] | str:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    raise AdapterError(f"cannot combine list and regex target_modules: {targets!r}")


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Add adapter `adapter_name` = the weighted combination of `adapters` (see the module docstring)."""
    configs = _configs(model)
    unknown = [a for a in adapters if a not in configs]
    if unknown or not adapters or len(adapters) != len(weights):
        raise AdapterError(f"adapters {adapters!r} / weights {weights!r}: unknown {unknown} or lengths differ")
    if any(configs[a].use_dora for a in adapters):
        raise AdapterError("add_weighted_adapter does not combine DoRA adapters (nor does peft)")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [configs[a].r for a in adapters]
    if combination_type == "linear":
        if len(set(ranks)) != 1 or any(configs[a].rank_pattern for a in adapters):
            raise AdapterError(f"combination_type='linear' needs equal ranks, got r={ranks} (use 'svd')")
        new_rank = ranks[0]
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise AdapterError(f"combination_type={combination_type!r}: minilora supports 'linear' and 'svd'")
    sources = [configs[a] for a in adapters]
    config = dataclasses.replace(
        sources[0],
        r=new_rank,
        alpha=new_rank,
        target_modules=_union_targets(sources),
        rank_pattern={},
        alpha_pattern={},
        init="default",
        inference_mode=True,
        modules_to_save=None,
        trainable_token_indices=None,
    )
    add_lora(model, config=config, adapter_name=adapter_name)
    for _, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.lora_A]
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if combination_type == "linear":
            scaled = [(a, w * layer.settings[a].scaling) for a, w in present]
            A.copy_(sum(math.copysign(math.sqrt(abs(w)), w) * layer.lora_A[a].weight for a, w in scaled))
            B.copy_(sum(math.sqrt(abs(w)) * layer.lora_B[a].weight for a, w in scaled))
        else:
            delta = sum(w * layer.lora_delta(a) for a, w in present)  # (out, in)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
            B.copy_(U[:, :new_rank] @ torch.diag(S[:new_rank]))  # (out, k)
            A.copy_(Vh[:new_rank, :])  # (k, in)


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Every adapter in peft's layout: "default" in `directory`, the others in `directory/<name>`."""
    directory = Path(directory)
    for name in _configs(model):
        save_adapter(model, directory if name == "default" else directory / name, adapter_name=name)
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load what `save_adapters` (or peft's save_pretrained of several adapters) wrote; returns the names."""
    directory = Path(directory)
    names = ["default"] if (directory / CONFIG_NAME).is_file() else []
    names += sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    if not names:
        raise AdapterError(f"{directory}: no {CONFIG_NAME} in it or in its subdirectories")
    for name in names:
        load_adapter(model, directory if name == "default" else directory / name, adapter_name=name)
    return names


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch goes through adapter `adapter_names[i]` ("__base__": none).

    peft's `model(input_ids, adapter_names=[...])`, for inference: each LoRA layer computes W x for the whole
    batch, then adds s B A x for each adapter's rows only (a layer the adapter does not target adds nothing).
    Generation: `greedy_batch(model, prompts, n, adapter_names=[...])`. Refused as peft refuses: in training
    mode, with merged adapters, or for DoRA adapters; also with modules_to_save, whose mixed rows are not built.

    >>> with mixed_batch(model, ["sql", "chat", "__base__"]):      # doctest: +SKIP
    ...     logits = model(ids)                                     # ids: 3 rows
    """
    names = list(adapter_names)
    configs = _configs(model)
    unknown = sorted(set(names) - set(configs) - {BASE})
    if unknown:
        raise AdapterError(f"mixed batch: no adapter named {unknown}; the model has {sorted(configs)} (and {BASE!r})")
    if model.training:
        raise AdapterError("mixed batch: the model is in training mode (peft refuses it too); call .eval() first")
    if extra_modules(model):
        raise AdapterError("mixed batch: the model has modules_to_save, whose per-row forward is not built")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        if layer.merged_adapters:
            raise AdapterError(f"mixed batch: adapters {layer.merged_adapters} are merged; unmerge them first")
        dora = sorted(n for n in set(names) if n in layer.lora_magnitude_vector)
        if dora:
            raise AdapterError(f"mixed batch: {dora} use DoRA, which peft's mixed batches do not take either")
    for layer in layers:
        layer.row_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None
