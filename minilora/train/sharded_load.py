"""FSDP2 loading of a checkpoint too large for one rank: each rank builds the model on the meta device and
fills only its own shards, one safetensors tensor at a time (``FSDP.load`` calls :func:`load_sharded`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minilora.nn import Linear4bit
from minilora.train.flat_4bit import FlatLinear4bit, dtensor_type, shard_like

SHARDED_QUANTIZE = (None, "nf4", "fp4")
TensorHook = Callable[[nn.Module, str, torch.Tensor], None]


def load_sharded(
    strategy: Any,  # minilora.train.distributed.FSDP
    path_or_id: str | os.PathLike,
    quantize: str | None = "nf4",
    *,
    prepare: Callable[[nn.Module], Any] | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    revision: str | None = None,
    on_tensor: TensorHook | None = None,
) -> nn.Module:
    """The model of ``path_or_id`` (see from_pretrained's arguments), sharded by ``strategy`` as it loads.

    ``FSDP.load`` calls it; instead of from_pretrained + the sharding ``FSDP.wrap`` does, for a base that
    does not fit on one rank:

    1. the decoder is built on the meta device and every key and shape of the checkpoint is checked from the
       file headers (``minilora.loading``'s plan: a bad file is refused before any weight is read);
    2. each decoder projection becomes a :class:`FlatLinear4bit` of the right layout, still on meta (the
       layout is that of a zero weight of the same shape, quantized once per distinct shape);
    3. ``prepare(model)`` (e.g. ``lambda m: add_lora(m, ...)``) adds the adapter: its tensors are real and
       drawn from the same random numbers as on a loaded model (the bases look like CPU modules while it runs);
    4. ``fully_shard`` as ``FSDP.wrap`` applies it (one unit per decoder layer, then the rest), the meta
       parameters get empty local shards (FSDP's lazy init takes them), and then
    5. the safetensors are read one tensor at a time: a projection's float weight is quantized, flattened
       as FlatLinear4bit does and this rank keeps its slice; any other tensor gives its slice
       (``distribute_tensor(full, mesh, placements, src_data_rank=None)``: every rank reads the file, no
       communication). A rank never holds more than its shards plus one full tensor (and its 4-bit bytes).

    The result trains through ``train(..., distributed=strategy)`` exactly as the load-then-shard path does
    (the same units and shards; FSDP.wrap finds the root unit made and gives it the loss).

    prepare: called once on the meta model before sharding, to add the adapter (default or gaussian LoRA
        init; PiSSA / OLoRA / LoftQ and DoRA, which read the base weight, modules_to_save and trainable tokens,
        which copy it, are refused with a ValueError).
    on_tensor: called with (model, key, full tensor) for every full tensor read, while it is alive (tests
        measure a rank's peak with it).
    """
    from minilora.io.checkpoint import SOURCE_ATTR, CheckpointReader
    from minilora.io.hub import resolve_model_dir
    from minilora.loading import _plan, _read, _stored_quantization, quantize_read
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaForCausalLM

    if quantize not in SHARDED_QUANTIZE:
        raise ValueError(f"FSDP.load: quantize={quantize!r}; the sharded loader takes one of {SHARDED_QUANTIZE}")
    device = torch.device(device)
    directory = resolve_model_dir(path_or_id, revision=revision)
    config = ModelConfig.from_json(directory / "config.json")
    if _stored_quantization(config, directory) is not None:
        raise ValueError(
            f"{directory / 'config.json'}: FSDP.load reads float checkpoints; this one is already quantized "
            "(load it with from_pretrained and let FSDP.wrap shard it)"
        )
    storage = strategy.param_dtype or torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with CheckpointReader(directory) as ckpt:
        plan = _plan(model, ckpt, directory)
        templates: dict[tuple, Linear4bit] = {}
        placeholders: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, name, meta tensor) for prepare
        for name, (kind, names) in plan.items():
            module = model.get_submodule(name)
            for p in names:  # the dtype each tensor will have, still on meta
                t = getattr(module, p)
                want = dtype if dtype is not None else ckpt.dtype(f"{name}.{p}")
                setattr(module, p, nn.Parameter(torch.empty_like(t, dtype=want), requires_grad=want.is_floating_point))
            if kind != "quantize":
                continue
            if quantize is not None:
                weight = module.weight
                key = (tuple(weight.shape), weight.dtype)
                if key not in templates:  # the layout depends on the shape alone
                    zero = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
                    args = (zero, None, quantize, double_quant, blocksize, compute_dtype)
                    templates[key] = quantize_read(ckpt, name, *args)
                module = _meta_flat(templates[key], storage, module.bias)
                model.set_submodule(name, module)
            attr = "quant_data" if quantize is not None else "weight"
            meta = getattr(module, attr)
            placeholders.append((module, attr, meta))
            # while prepare runs the base holds a real empty tensor: LoRALinear puts its adapter on that device
            setattr(module, attr, nn.Parameter(meta.new_empty(0, device=device), requires_grad=meta.requires_grad))
        del templates
        model.tie_weights()
        if prepare is not None:
            try:
                prepare(model)
            except Exception as e:  # e.g. an init that reads the base weight, absent here
                raise ValueError(
                    f"FSDP.load: prepare() failed on the model before its weights are loaded ({type(e).__name__}: "
                    f"{e}); it may only add adapters that do not read the base weights"
                ) from e
            _check_adapter(model)
        for module, attr, meta in placeholders:
            setattr(module, attr, nn.Parameter(meta, requires_grad=getattr(module, attr).requires_grad))
        strategy.shard_model(model, device)
        _materialize(model, device)

        for name, (_, names) in plan.items():
            module = _base_of(model.get_submodule(name))
            for p in names:
                key = f"{name}.{p}"
                tensor = _read(ckpt, key, dtype, device)
                if on_tensor is not None:
                    on_tensor(model, key, tensor)
                if p == "weight" and isinstance(module, FlatLinear4bit):
                    linear = quantize_read(ckpt, name, tensor, None, quantize, double_quant, blocksize, compute_dtype)
                    flat = FlatLinear4bit(linear, storage)
                    del tensor, linear
                    if flat.layout != module.layout:  # pragma: no cover (a bug, not bad input)
                        raise AssertionError(f"{key}: the quantized layout differs from the planned one")
                    tensor, p = flat.quant_data, "quant_data"
                    del flat
                _fill(getattr(module, p), tensor, key)
                del tensor
    model.reset_rope(device)
    setattr(model, SOURCE_ATTR, directory)
    return model.eval()


def _meta_flat(template: Linear4bit, storage: torch.dtype, bias: nn.Parameter | None) -> Any:
    """A FlatLinear4bit of ``template``'s layout with its bytes (and bias) on the meta device."""
    flat = FlatLinear4bit(template, storage)
    flat.quant_data = nn.Parameter(torch.empty_like(flat.quant_data, device="meta"), requires_grad=False)
    flat.bias = bias
    return flat


def _base_of(module: nn.Module) -> nn.Module:
    from minilora.lora.layer import LoRALinear

    return module.base_layer if isinstance(module, LoRALinear) else module


def _check_adapter(model: nn.Module) -> None:
    """The adapter of ``prepare`` must not copy the (absent) base weights (an init or DoRA that reads them
    already failed in prepare, on the empty stand-in tensors)."""
    for name, config in getattr(model, "lora_configs", {}).items():
        problems = [
            f"modules_to_save={config.modules_to_save!r}" if config.modules_to_save else "",
            f"trainable_token_indices={config.trainable_token_indices!r}" if config.trainable_token_indices else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(
                f"FSDP.load: adapter {name!r} has {', '.join(problems)}, which copies base weights that are not "
                "loaded yet; add LoRA layers only, or load with from_pretrained and let FSDP.wrap shard the model"
            )
    left = [n for n, p in model.named_parameters() if p.requires_grad and p.is_meta]
    if left:
        raise ValueError(f"FSDP.load: prepare() left trainable tensors on the meta device: {left[:3]}")


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Empty local storage for every meta parameter (tied ones stay tied); FSDP's lazy init takes them."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]


@torch.no_grad()
def _fill(param: torch.Tensor, full: torch.Tensor, key: str) -> None:
    """This rank's part of ``full`` into ``param`` (a sharded DTensor, or a plain tensor)."""
    if tuple(full.shape) != tuple(param.shape):  # pragma: no cover (the plan checked every shape)
        raise AssertionError(f"{key}: shape {list(full.shape)} for a parameter of shape {list(param.shape)}")
    if isinstance(param, dtensor_type()):
        param.to_local().copy_(shard_like(full, param).to_local())
    else:
        param.copy_(full)
