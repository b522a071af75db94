"""Model-level LoRA operations: add adapters, switch/disable them, merge, unload, count parameters.

Every function walks the model once over `named_modules`; the model class knows nothing of LoRA.
The adapter configs live in `model.lora_configs` ({adapter name: LoRAConfig}), the only attribute
minilora adds to a model besides swapping Linear modules for `LoRALinear`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from minilora.lora.config import LoRAConfig
from minilora.lora.extras import (
    FullModule,
    ModulesToSave,
    TrainableTokens,
    extra_modules,
    save_targets,
    token_targets,
)
from minilora.lora.layer import LoRALinear, MergeReport
from minilora.lora.targeting import find_targets, pattern_value
from minilora.nn import QuantizedLinear


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(full name, layer) of every LoRALinear in the model, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def _configs(model: nn.Module) -> dict[str, LoRAConfig]:
    configs = getattr(model, "lora_configs", None)
    if configs is None:
        configs = {}
        model.lora_configs = configs
    return configs


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 8,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    *,
    init: str = "default",
    exclude_modules: list[str] | str | None = None,
    layers_to_transform: list[int] | int | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    modules_to_save: list[str] | None = None,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype = torch.float32,
    config: LoRAConfig | None = None,
) -> nn.Module:
    """Wrap the targeted Linears in LoRALinear (in place) and freeze everything but the adapters.

    Pass either the keyword settings or a ready `config`. Adding a second adapter name to a model that
    already has one adds it to the same LoRALinear layers; the active adapter does not change (use
    `set_adapter`). Returns the model.
    """
    if config is None:
        config = LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
            exclude_modules=exclude_modules,
            layers_to_transform=layers_to_transform,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
            use_rslora=use_rslora,
            use_dora=use_dora,
            init=init,
            modules_to_save=modules_to_save,
            trainable_token_indices=trainable_token_indices,
        )
    configs = _configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    targets = find_targets(model, config)
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no Linear module in the model")
    first_adapter = not configs
    current = None if first_adapter else active_adapter(model)
    if first_adapter:
        for param in model.parameters():
            param.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        r_i = int(pattern_value(config.rank_pattern, name, config.r))
        alpha_i = pattern_value(config.alpha_pattern, name, config.alpha)
        settings = dict(
            dropout=config.dropout,
            init=config.init,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            adapter_dtype=adapter_dtype,
            loftq_config=config.loftq_config,
        )
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r_i, alpha_i, **settings)
        else:
            layer = LoRALinear(module, r_i, alpha_i, adapter_name=adapter_name, **settings)
            if current is not None:
                layer.set_adapter(current)  # a new layer follows the model's active adapter
            model.set_submodule(name, layer)
    _add_full_modules(model, config, adapter_name, current)
    configs[adapter_name] = config
    _update_trainable(model)
    return model


def _add_full_modules(model: nn.Module, config: LoRAConfig, adapter_name: str, current: str | None) -> None:
    """modules_to_save and trainable_token_indices of `config` (lora/extras.py), under `adapter_name`."""
    for name in save_targets(model, config.modules_to_save):
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        else:
            wrapper = ModulesToSave(module, adapter_name)
            wrapper.active_adapter = current or adapter_name
            model.set_submodule(name, wrapper)
    for name, indices in token_targets(model, config.trainable_token_indices).items():
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokens):
            module.add_adapter(adapter_name, indices)
        else:
            wrapper = TrainableTokens(module, adapter_name, indices)
            wrapper.active_adapter = current or adapter_name
            model.set_submodule(name, wrapper)


def adapter_modules(model: nn.Module) -> list[tuple[str, LoRALinear | FullModule]]:
    """Every module that holds per-adapter tensors: LoRALinear, ModulesToSave, TrainableTokens."""
    return [*lora_layers(model), *extra_modules(model)]


def _update_trainable(model: nn.Module) -> None:
    """Only the active adapter's tensors train (none in inference mode); base weights never do."""
    configs = _configs(model)
    for _, layer in adapter_modules(model):
        for name in configs:
            trainable = name == layer.active_adapter and not configs[name].inference_mode
            for param in layer.adapter_parameters(name) if _holds(layer, name) else []:
                param.requires_grad_(trainable)


def _holds(layer: nn.Module, name: str) -> bool:
    if isinstance(layer, LoRALinear):
        return name in layer.lora_A
    return bool(layer.adapter_parameters(name))


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` active on every LoRA layer (layers without it compute the base alone)."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    for _, layer in lora_layers(model):
        layer.set_adapter(adapter_name)
    for _, module in extra_modules(model):
        module.active_adapter = adapter_name
    _update_trainable(model)


def active_adapter(model: nn.Module) -> str:
    """The adapter name active on the model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    return layers[0][1].active_adapter


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model alone (peft's `disable_adapter()`)."""
    layers = [layer for _, layer in adapter_modules(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def merge_adapters(model: nn.Module, adapter_name: str | None = None) -> list[MergeReport]:
    """Fold the (active) adapter into every base weight; returns one report per layer.

    On quantized bases each report carries the requantization error of that layer. Layers the adapter does not
    target are left as they are (peft's merge_adapter does the same).
    """
    name, configs = adapter_name or active_adapter(model), _configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(configs)}")
    return [layer.merge(name, module_name=where) for where, layer in lora_layers(model) if name in layer.lora_A]


def unmerge_adapters(model: nn.Module) -> None:
    """Undo `merge_adapters` on every layer that has a merged adapter."""
    for _, layer in lora_layers(model):
        while layer.merged_adapters:
            layer.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + s B A (quantized bases dequantized).

    dtype: of the new Linears (default: the base weight's dtype, i.e. the dtype a quantized weight was
    quantized from). The result has transformers' module names and no LoRA state; save it with any
    transformers-format checkpoint writer.
    """
    for name, layer in lora_layers(model):
        model.set_submodule(name, layer.to_linear(dtype))
    for name, module in extra_modules(model):
        model.set_submodule(name, module.unwrapped())
    if hasattr(model, "tie_weights") and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted as peft's `get_nb_trainable_parameters` does.

    A quantized Linear keeps its packed weight in buffers, not parameters; it is counted as
    in_features * out_features parameters (its logical size). peft counts a bitsandbytes 4-bit weight
    as 2 params per packed byte and an 8-bit one as 1 per byte, which is the same number whenever
    in_features * out_features is even (every real model).
    """
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features
    return trainable, total


def trainable_parameters_report(model: nn.Module) -> str:
    """peft's line: `trainable params: 27,262,976 || all params: 8,057,524,224 || trainable%: 0.3384`."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> str:
    """Same as `trainable_parameters_report` (the name peft uses); returns the line, prints nothing."""
    return trainable_parameters_report(model)


def adapter_nbytes(model: nn.Module, adapter_name: str | None = None) -> int:
    """Bytes of adapter `adapter_name` (default: active) as stored: A, B (and DoRA m) in their dtype.

    Equals the tensor payload of adapter_model.safetensors (the file adds a small JSON header).
    """
    total = 0
    for _, layer in lora_layers(model):
        name = adapter_name or layer.active_adapter
        if name in layer.lora_A:
            total += sum(p.numel() * p.element_size() for p in layer.adapter_parameters(name))
    return total
