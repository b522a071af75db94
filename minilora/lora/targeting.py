"""Which modules get a LoRA adapter, and with which r and alpha: peft 0.21's matching rules.

- target_modules as a list: a module matches if its full name equals an entry or ends with "." + entry
  (so both the old suffix form ["q_proj"] and the new full-path form work);
  as a string: a regex that must fullmatch the full name; "all-linear": every Linear (float, 8-bit or
  4-bit) except the output head.
- exclude_modules (list with the same rule, or a fullmatch regex) wins over target_modules.
- layers_to_transform: keep only modules whose first numbered segment (`layers.N.`) is in the list.
- rank_pattern / alpha_pattern: keys are regexes matched as `(.*\\.)?(key)$`, first match wins.
"""

from __future__ import annotations

import re

from torch import nn

from minilora.lora.config import LoRAConfig
from minilora.lora.extras import ModulesToSave, TrainableTokens
from minilora.lora.layer import LoRALinear
from minilora.nn import QuantizedLinear

OUTPUT_HEAD_NAMES = ("lm_head",)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a quantized Linear (anything with in/out features and dequantize())."""
    return isinstance(module, nn.Linear) or isinstance(module, QuantizedLinear)


def _matches_name_list(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first numbered segment of `key` (the decoder layer index), as peft finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: LoRAConfig, key: str) -> bool:
    """peft's `check_target_module_exists` for a module's full name (all-linear is resolved elsewhere)."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif _matches_name_list(list(exclude), key):
            return False
    target = config.target_modules
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    if not any(key.endswith(f".{name}") for name in target):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and len(wanted) == 0):
        return True
    index = _layer_index(key, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): `lm_head`, or whatever `get_output_embeddings()` returns."""
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in OUTPUT_HEAD_NAMES}
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
        if head is not None:
            heads |= {name for name, module in model.named_modules() if module is head}
    return heads


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear that could take an adapter, skipping the insides of LoRALinear.

    A LoRALinear itself is listed (under its own name) so that a second adapter can be added to it.
    """
    inside: list[str] = []
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (ModulesToSave, TrainableTokens)):
            inside.append(name)  # trained in full: no adapter inside (peft alike)
        elif isinstance(module, LoRALinear):
            inside.append(name)
            out.append((name, module))
        elif is_linear(module):
            out.append((name, module))
    return out


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Full names of the modules `config` puts an adapter on, in model order."""
    candidates = candidate_modules(model)
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        heads = output_head_names(model)
        names = [name for name, _ in candidates if name not in heads]
        resolved = LoRAConfig(**{**config.__dict__, "target_modules": names})
        return [name for name in names if is_target(resolved, name)]
    return [name for name, _ in candidates if name and is_target(config, name)]


def pattern_value(patterns: dict[str, float], key: str, default: float) -> float:
    """The value of the first pattern matching `key` as `(.*\\.)?(pattern)$`, else `default` (peft rule)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default
