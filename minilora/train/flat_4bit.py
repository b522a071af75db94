"""The flat 4-bit layout FSDP2 shards: a Linear4bit whose packed codes and quant state are one float-typed
parameter (as bitsandbytes' ``quant_storage`` does), and the DTensor helpers the strategies and the sharded
loader share. See minilora.train.distributed for how FSDP uses it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minilora.nn import Linear4bit

ALIGN = 16  # bytes: every piece of a flat 4-bit weight starts aligned for any dtype view


class FlatLinear4bit(Linear4bit):
    """A Linear4bit whose packed codes and quant state are one flat parameter ``quant_data``
    (the layout is drawn in minilora.train.distributed's docstring).

    ``weight``, ``absmax``, ... are read back from the bytes on each access, so Linear4bit's forward,
    dequantize and quant_state run unchanged on the all-gathered parameter.
    """

    def __init__(self, linear: Linear4bit, quant_storage: torch.dtype) -> None:
        nn.Module.__init__(self)
        for name in ("out_features", "in_features", "blocksize", "quant_type", "weight_dtype", "compute_dtype"):
            setattr(self, name, getattr(linear, name))
        if hasattr(linear, "nested_blocksize"):
            self.nested_blocksize = linear.nested_blocksize
        chunks, self.layout, pos = [], {}, 0
        for name, t in linear.named_buffers(recurse=False):
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            self.layout[name] = (pos, raw.numel(), t.dtype, tuple(t.shape))
            pad = -raw.numel() % ALIGN
            chunks += [raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)]
            pos += raw.numel() + pad
        flat = torch.cat(chunks)  # pos bytes, a multiple of ALIGN, so of quant_storage's size
        self.quant_data = nn.Parameter(flat.view(quant_storage), requires_grad=False)
        self.bias = linear.bias

    def __getattr__(self, name: str) -> Any:
        layout = self.__dict__.get("layout")
        if layout is not None and name in layout:
            pos, n, dtype, shape = layout[name]
            raw = self.quant_data.view(torch.uint8)[pos : pos + n]
            if raw.storage_offset() % dtype.itemsize:  # an all-gather buffer at an odd offset: copy to view it
                raw = raw.clone()
            return raw.view(dtype).reshape(shape)
        return super().__getattr__(name)

    # the flat parameter is the state (sharded or not), not bitsandbytes' keys
    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict


def flatten_4bit(model: nn.Module, quant_storage: torch.dtype = torch.float32) -> int:
    """Swap every Linear4bit of ``model`` for a FlatLinear4bit (bit-identical outputs); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is Linear4bit]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FlatLinear4bit(module, quant_storage))
    return len(targets)


def dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_like(t: Any, param: torch.Tensor) -> Any:
    """A full tensor as the shard of ``param``'s layout (no communication: every rank read the file)."""
    if not (isinstance(param, dtensor_type()) and torch.is_tensor(t) and t.shape == param.shape):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
