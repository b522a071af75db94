"""LoRA+ (Hayou et al. 2024): train B with a learning rate `ratio` times that of A.

With A and B on one learning rate, the update of B A is dominated by one of them as the width grows;
section 3 shows feature learning needs eta_B / eta_A = Theta(width), in practice a ratio of 2 to 32:

    group A          every trainable tensor but those below       lr,            weight_decay
    group B          lora_B and 1-D tensors (DoRA magnitude)      lr * ratio,    weight_decay
    group B no decay the same, inside a LayerNorm or a bias       lr * ratio,    0.0
    embedding        LoRA on embeddings (none in minilora)        lr_embedding,  weight_decay

The groups and their order are peft's `create_loraplus_optimizer`, so the same model trains the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters inside a LayerNorm or named `bias` (transformers' get_parameter_names rule)."""
    out = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                out.add(full)
    return out


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """The optimizer parameter groups of LoRA+ for the model's trainable tensors (see the table above)."""
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the LoRA+ groups; other keyword arguments go to the optimizer (peft's signature)."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio!r}")
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)
