"""``from_pretrained``: a transformers-layout checkpoint to a minilora model, optionally quantized on load.

The loading recipe (gpt-fast's, and QLoRA's section 3 for what gets quantized):

1. resolve the directory (a local path, or a hub id through huggingface_hub) and read config.json;
2. build the model on the meta device: every module exists, no memory is allocated;
3. check every checkpoint key and shape against the model from the file headers alone, so a bad file is
   refused before any weight is read (never a half-loaded model);
4. stream the tensors one at a time: each is read, cast to ``dtype``, moved to ``device`` and put in
   place (onto a GPU it is read through page-locked buffers and cast there:
   ``CheckpointReader.get_on``). With ``quantize`` set, each decoder projection (q, k, v, o, gate, up, down; never the
   embeddings or the output head) is quantized as it arrives and swapped for a ``Linear4bit`` /
   ``Linear8bit``, so peak memory stays near the quantized model's size plus one float weight.

Checkpoints already quantized by transformers + bitsandbytes (``quantization_config.quant_method ==
"bitsandbytes"``, keys as in formats.md section 3) load through ``Linear4bit.from_bnb_state_dict`` /
``Linear8bit.from_bnb_state_dict``; :func:`save_quantized` writes that same format back, with the
``quantization_config`` transformers needs to load it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minilora.io.checkpoint import (
    SOURCE_ATTR,
    CheckpointError,
    CheckpointReader,
    check_finite,
    check_output_is_not_source,
    save_checkpoint,
)
from minilora.io.hub import resolve_model_dir
from minilora.models.config import ModelConfig
from minilora.models.llama import LlamaForCausalLM
from minilora.quant.state import dtype_name

logger = logging.getLogger(__name__)

QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
QUANTIZE_CHOICES = (None, "nf4", "fp4", "int8")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # old checkpoints stored the RoPE frequencies


def from_pretrained(
    path_or_id: str | os.PathLike,
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    int8_threshold: float = 6.0,
    revision: str | None = None,
) -> LlamaForCausalLM:
    """Load a Llama / Mistral / Qwen2 checkpoint (directory or hub id) as a minilora model.

    quantize: None (float), "nf4" / "fp4" (4-bit blockwise, ``blocksize``, ``double_quant``) or "int8"
        (LLM.int8 with outlier ``int8_threshold``), applied to the decoder projections as they load.
        A checkpoint already quantized by bitsandbytes loads as stored; ``quantize`` must then be None or
        name the stored format.
    dtype: dtype of every float tensor (and of the weights before quantization); None keeps the stored one.
    compute_dtype: dtype the quantized layers compute in (None: the input's dtype).
    allow_pickle: read ``pytorch_model.bin`` checkpoints (with ``torch.load(weights_only=True)``).

    Returns the model in eval mode with its :class:`ModelConfig` at ``model.config``.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}; choose one of {QUANTIZE_CHOICES}")
    directory = resolve_model_dir(path_or_id, revision=revision, allow_pickle=allow_pickle)
    config = ModelConfig.from_json(directory / "config.json")
    stored_quant = _stored_quantization(config, directory)
    if stored_quant is not None and quantize is not None and quantize != stored_quant:
        raise ValueError(
            f"{directory / 'config.json'}: the checkpoint is already quantized as {stored_quant}; "
            f"cannot load it as quantize={quantize!r}"
        )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)

    with CheckpointReader(directory, allow_pickle=allow_pickle) as ckpt:
        plan = _plan(model, ckpt, directory)
        threshold = float((config.quantization_config or {}).get("llm_int8_threshold", int8_threshold))
        for name, (kind, names) in plan.items():
            if kind == "prequantized":
                new = _load_prequantized(ckpt, name, dtype, device, compute_dtype, threshold)
                model.set_submodule(name, new)
                continue
            module = model.get_submodule(name)
            params = {p: _read(ckpt, f"{name}.{p}", dtype, device) for p in names}
            if kind == "quantize" and quantize is not None:
                args = (params["weight"], params.get("bias"), quantize, double_quant, blocksize, compute_dtype)
                model.set_submodule(name, quantize_read(ckpt, name, *args, int8_threshold))
            else:
                for p, tensor in params.items():
                    setattr(module, p, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))

    model.tie_weights()
    model.reset_rope(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left on the meta device after loading: {leftover}"
    setattr(model, SOURCE_ATTR, directory)  # save_pretrained / save_quantized refuse to write there
    return model.eval()


# ---------------------------------------------------------------------------------------------- planning
def _stored_quantization(config: ModelConfig, directory: Path) -> str | None:
    """The quantization a checkpoint was saved with: None, "nf4", "fp4" or "int8"."""
    qc = config.quantization_config
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(
            f"{directory / 'config.json'}: quantization_config.quant_method={method!r} is not supported "
            "(only checkpoints quantized by bitsandbytes)"
        )
    if qc.get("load_in_4bit"):
        return qc.get("bnb_4bit_quant_type", "fp4")
    if qc.get("load_in_8bit"):
        return "int8"
    raise ValueError(f"{directory / 'config.json'}: quantization_config has neither load_in_4bit nor load_in_8bit")


def _is_prequantized(ckpt: CheckpointReader, name: str) -> bool:
    return (
        f"{name}.weight.quant_state.bitsandbytes__nf4" in ckpt
        or f"{name}.weight.quant_state.bitsandbytes__fp4" in ckpt
        or f"{name}.SCB" in ckpt
    )


def _plan(model: LlamaForCausalLM, ckpt: CheckpointReader, directory: Path) -> dict[str, tuple[str, list[str]]]:
    """Check every key and shape against the model; return {module: (kind, names of parameters to read)}.

    kind is "float" (read as stored), "quantize" (a decoder projection, quantized when asked) or
    "prequantized" (already in bitsandbytes' format in the checkpoint).

    Raises CheckpointError naming the file and key for a missing key, an unexpected key or a wrong shape.
    """
    config_file = directory / "config.json"
    expected: dict[str, tuple[int, ...]] = {}  # key -> shape, for tensors read as stored
    claimed: set[str] = set()  # keys accounted for (expected, prequantized or ignorable)
    plan: dict[str, tuple[str, list[str]]] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        quantizable = isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZABLE
        if quantizable and _is_prequantized(ckpt, name):
            plan[name] = ("prequantized", [])
            for key in ckpt.keys():
                if key.startswith(f"{name}.weight") or key in (f"{name}.SCB", f"{name}.weight_format"):
                    claimed.add(key)
            if module.bias is not None:
                expected[f"{name}.bias"] = tuple(module.bias.shape)
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            claimed.add("lm_head.weight")  # shared with embed_tokens; a stored copy is ignored
            continue
        plan[name] = ("quantize" if quantizable else "float", [p for p, _ in own])
        for p, tensor in own:
            expected[f"{name}.{p}"] = tuple(tensor.shape)

    claimed.update(k for k in ckpt.keys() if k.endswith(_IGNORED_SUFFIXES))

    missing = [k for k in expected if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{ckpt.source}: missing key {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f", which {config_file} requires"
        )
    for key, shape in expected.items():
        if not ckpt.dtype(key).is_floating_point:
            raise CheckpointError(
                f"{ckpt.file_of(key)}: key {key!r} is {ckpt.dtype(key)}, a quantized weight without its "
                "quantization state (bitsandbytes keys: .SCB for 8-bit, "
                ".weight.absmax / .weight.quant_state.bitsandbytes__nf4|fp4 ... for 4-bit)"
            )
        stored = ckpt.shape(key)
        if stored != shape:
            raise CheckpointError(
                f"{ckpt.file_of(key)}: key {key!r} has shape {list(stored)}, but {config_file} implies {list(shape)}"
            )
    unexpected = [k for k in ckpt.keys() if k not in expected and k not in claimed]
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{ckpt.file_of(key)}: unexpected key {key!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f"; a {model.config.model_type} model as described by {config_file} has no such tensor"
        )
    return plan


# ---------------------------------------------------------------------------------------------- loading
def _read(ckpt: CheckpointReader, key: str, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    """One tensor on `device`, cast to `dtype`: on a GPU read there (page-locked copies) and cast piece by piece.

    Checked for NaN/Inf once, here (after the cast, so an overflow to float16 shows too), never in a forward.
    """
    tensor = ckpt.get_on(key, device, dtype)
    check_finite(tensor, ckpt.file_of(key), key)
    return tensor


def quantize_read(
    ckpt: CheckpointReader,
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quantize: str,
    double_quant: bool,
    blocksize: int,
    compute_dtype: torch.dtype | None,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """The quantized Linear of module ``name``'s weight just read from ``ckpt``; an error names file and key."""
    from minilora.nn import Linear4bit, Linear8bit

    try:
        if quantize == "int8":
            return Linear8bit.from_weight(weight, bias, threshold=int8_threshold, compute_dtype=compute_dtype)
        return Linear4bit.from_weight(
            weight,
            bias,
            blocksize=blocksize,
            quant_type=quantize,
            compress_statistics=double_quant,
            compute_dtype=compute_dtype,
        )
    except ValueError as e:  # the quantizer's message names the problem; the file and key go first
        key = f"{name}.weight"
        raise CheckpointError(f"{ckpt.file_of(key)}: key {key!r}: cannot quantize to {quantize}: {e}") from e


def _load_prequantized(
    ckpt: CheckpointReader,
    name: str,
    dtype: torch.dtype | None,
    device: torch.device | str,
    compute_dtype: torch.dtype | None,
    threshold: float,
) -> nn.Module:
    from minilora.nn import Linear4bit, Linear8bit

    keys = [k for k in ckpt.keys() if k.startswith(f"{name}.")]
    tensors = {k: ckpt.get(k).to(device) for k in keys}
    for k, t in tensors.items():  # bias, absmax, SCB, code tables: NaN there would poison the whole layer
        check_finite(t, ckpt.file_of(k), k)
    bias_key = f"{name}.bias"
    if bias_key in tensors and dtype is not None:
        tensors[bias_key] = tensors[bias_key].to(dtype)
    prefix = f"{name}."
    try:
        if f"{name}.SCB" in tensors:
            return Linear8bit.from_bnb_state_dict(tensors, prefix, threshold=threshold, compute_dtype=compute_dtype)
        return Linear4bit.from_bnb_state_dict(tensors, prefix, compute_dtype=compute_dtype)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.file_of(keys[0])}: {e}") from e


# ---------------------------------------------------------------------------------------------- saving
def quantization_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The transformers ``quantization_config`` describing the model's quantized layers (None if none)."""
    from minilora.nn import Linear4bit, Linear8bit

    four = [m for m in model.modules() if isinstance(m, Linear4bit)]
    eight = [m for m in model.modules() if isinstance(m, Linear8bit)]
    if not four and not eight:
        return None
    if four and eight:
        raise ValueError("the model mixes 4-bit and 8-bit layers; bitsandbytes checkpoints hold one kind")
    embed_dtype = model.get_submodule("model.embed_tokens").weight.dtype
    qc: dict[str, Any] = {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": bool(four),
        "_load_in_8bit": bool(eight),
        "load_in_4bit": bool(four),
        "load_in_8bit": bool(eight),
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    if four:
        kinds = {(m.quant_type, hasattr(m, "nested_absmax")) for m in four}  # nested absmax = double quant
        if len(kinds) > 1:
            raise ValueError(f"the model mixes 4-bit formats {sorted(kinds)}; a checkpoint records one")
        ((quant_type, double),) = kinds
        compute = four[0].compute_dtype or embed_dtype
        qc.update(
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=dtype_name(compute),
        )
    else:
        qc["llm_int8_threshold"] = float(eight[0].threshold)
    return qc


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to save, quantized layers in bitsandbytes' key format (formats.md section 3)."""
    tensors: dict[str, torch.Tensor] = {}
    done: list[str] = []  # prefixes of modules that wrote their own keys
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        if hasattr(module, "bnb_state_dict"):
            tensors.update(module.bnb_state_dict(f"{name}."))
            done.append(f"{name}.")
            continue
        for p, t in module.named_parameters(recurse=False):
            tensors[f"{name}.{p}" if name else p] = t
        for b, t in module.named_buffers(recurse=False):
            if b not in module._non_persistent_buffers_set:
                tensors[f"{name}.{b}" if name else b] = t
    config = getattr(model, "config", None)
    if config is not None and config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_quantized(model: LlamaForCausalLM, directory: str | os.PathLike, max_shard_size: int | None = None) -> None:
    """Save a quantized model so transformers + bitsandbytes (and :func:`from_pretrained`) load it.

    Writes config.json with its ``quantization_config`` and the weights in bitsandbytes' key format.
    """
    import dataclasses

    qc = quantization_config_of(model)
    if qc is None:
        raise ValueError(
            "save_quantized: the model has no quantized layers; use minilora.io.checkpoint.save_pretrained"
        )
    tensors = quantized_tensors(model)
    check_output_is_not_source(model, directory)
    embed_dtype = dtype_name(model.model.embed_tokens.weight.dtype)
    config = dataclasses.replace(model.config, quantization_config=qc, torch_dtype=embed_dtype)
    files = {"config.json": config.to_json_bytes()}
    save_checkpoint(tensors, directory, max_shard_size=max_shard_size, extra_files=files)
