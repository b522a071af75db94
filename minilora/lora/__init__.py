"""minilora.lora: LoRA / QLoRA adapters (LoRALinear, DoRA, rsLoRA), peft targeting and peft adapter files."""

from minilora.lora.api import (
    active_adapter,
    adapter_nbytes,
    add_lora,
    count_parameters,
    disable_adapters,
    lora_layers,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters_report,
    unmerge_adapters,
)
from minilora.lora.config import LoRAConfig
from minilora.lora.extras import ModulesToSave, TrainableTokens
from minilora.lora.layer import AdapterSettings, LoRALinear, MergeReport
from minilora.lora.loraplus import create_loraplus_optimizer, loraplus_param_groups
from minilora.lora.multi import add_weighted_adapter, delete_adapter, load_adapters, mixed_batch, save_adapters
from minilora.lora.peft_io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from minilora.lora.targeting import find_targets, is_target, pattern_value

__all__ = [
    "AdapterSettings",
    "LoRAConfig",
    "LoRALinear",
    "MergeReport",
    "ModulesToSave",
    "TrainableTokens",
    "active_adapter",
    "adapter_nbytes",
    "adapter_state_dict",
    "add_lora",
    "add_weighted_adapter",
    "create_loraplus_optimizer",
    "delete_adapter",
    "count_parameters",
    "disable_adapters",
    "find_targets",
    "is_target",
    "load_adapter",
    "load_adapters",
    "loraplus_param_groups",
    "lora_layers",
    "merge_adapters",
    "merge_and_unload",
    "mixed_batch",
    "pattern_value",
    "print_trainable_parameters",
    "read_adapter_config",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "trainable_parameters_report",
    "unmerge_adapters",
]
