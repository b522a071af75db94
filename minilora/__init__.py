"""minilora: LoRA and QLoRA from scratch in plain PyTorch.

    model = minilora.from_pretrained("path/or/hub-id", quantize="nf4")   # NF4 + double quant on load
    minilora.add_lora(model, r=32, alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    ... train ...
    minilora.save_adapter(model, "adapter/")                           # peft's file format

Packages: quant/ (NF4, FP4, int8: the reference), kernels/ (fast paths and the door that picks them),
nn/ (the quantized Linears), lora/ (adapters), models/ (the decoder), io/ (checkpoints, GGUF, tokenizer),
train/ (data, loop, checkpoints).
"""

from .loading import from_pretrained, save_quantized
from .lora import (
    adapter_nbytes,
    add_lora,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "adapter_nbytes",
    "add_lora",
    "from_pretrained",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "save_quantized",
    "unmerge_adapters",
]
