"""Memory footprint of a model from its config alone: fp32, bf16, LLM.int8, NF4 (+ double quant), + LoRA.

No weight is read or allocated: the decoder is built on the meta device (every module and shape exists,
no memory does) and its parameters are counted. The bytes then follow from the storage formats
(formats.md sections 1-4):

    precision   decoder Linears (q,k,v,o,gate,up,down; Phi-3's qkv, gate_up)   everything else
    fp32        4 B/param                                      4 B/param
    bf16        2 B/param                                      2 B/param
    int8        1 B/param + SCB (float32 per output row)       2 B/param
    nf4         0.5 B/param + absmax (float32 per 64)          2 B/param       = 4.5   bits/param
    nf4+dq      0.5 B/param + absmax (uint8 per 64)            2 B/param       ~ 4.127 bits/param
                + nested absmax (float32 per 256 blocks)
    (4-bit layers also hold the 16-entry code table, and with double quant the 256-entry nested code
    and the float32 offset)

Two counts per line (QLoRA section 3 reports the first kind):
- the transformers count: what ``PreTrainedModel.get_memory_footprint()`` returns for the same model
  loaded by transformers + bitsandbytes. It sums ``numel * element_size`` of parameters and buffers, so a
  4-bit weight counts its packed bytes only and the quant state (absmax, nested absmax, code tables) is
  left out, as is the int8 ``SCB``. ``transformers_param_bytes`` is the same without buffers
  (``return_buffers=False``); the buffers of a transformers Llama are two float32 copies of the RoPE
  inverse frequencies (``inv_freq`` and ``original_inv_freq``, head_dim / 2 each).
- the true bytes: everything the quantized model keeps in memory, quant state included.

For Llama-3.1-8B (8,030,261,248 parameters, 6,979,321,856 in the decoder Linears) the transformers count
is 32.12 GB at fp32, 9.08 GB at 8-bit and 5,591,539,712 B (5.59 GB) at NF4; the true NF4+DQ bytes are
about 0.11 GB higher, and an fp32 LoRA r=32 on q,k,v,o adds 109,051,904 B (5.70 GB in all).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from minilora.models.config import ModelConfig

QUANTIZED_LINEARS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)
GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "buffers", "lora")
NF4_CODE_BYTES = 16 * 4  # quant_map: 16 float32
NESTED_CODE_BYTES = 256 * 4  # nested_quant_map: the 8-bit dynamic code, 256 float32
OFFSET_BYTES = 4  # nested_offset: one float32
NESTED_BLOCKSIZE = 256

_PRECISIONS = {
    # name: (bytes per float param outside the quantized Linears, quantization of the decoder Linears)
    "fp32": (4, None),
    "bf16": (2, None),
    "int8": (2, "int8"),
    "nf4": (2, "nf4"),
    "nf4+dq": (2, "nf4+dq"),
}
_DESCRIPTIONS = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "int8": "LLM.int8 decoder Linears, rest bf16",
    "nf4": "NF4 decoder Linears, rest bf16",
    "nf4+dq": "NF4 + double quant, rest bf16",
}


@dataclass(frozen=True)
class FootprintLine:
    """The bytes of one precision, as transformers counts them and as they truly are."""

    name: str  # "fp32", "bf16", "int8", "nf4", "nf4+dq" or "nf4+dq+lora"
    description: str
    transformers_bytes: int  # get_memory_footprint(): parameters + buffers
    transformers_param_bytes: int  # get_memory_footprint(return_buffers=False)
    true_bytes: int  # including quant state (absmax, nested absmax, code tables, offset, SCB)
    breakdown_transformers: dict[str, int]  # group -> bytes as transformers counts them
    breakdown_true: dict[str, int]  # group -> true bytes

    @property
    def quant_state_bytes(self) -> int:
        """Bytes transformers does not count: 4-bit quant state and int8 SCB."""
        return self.true_bytes - self.transformers_bytes


@dataclass
class Footprint:
    """Parameter counts of a config and its :class:`FootprintLine` per precision."""

    source: str
    config: ModelConfig
    params: int  # unique parameters (a tied head counted once)
    decoder_linear_params: int  # weights of q,k,v,o,gate,up,down over all layers (the quantized ones)
    group_params: dict[str, int]
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_params: int
    blocksize: int
    lines: list[FootprintLine] = field(default_factory=list)

    def line(self, name: str) -> FootprintLine:
        for line in self.lines:
            if line.name == name:
                return line
        raise KeyError(f"no footprint line {name!r}; lines are {[x.name for x in self.lines]}")


# ---------------------------------------------------------------------------------------------- config
def load_config(path_or_config: str | os.PathLike | ModelConfig | dict) -> tuple[ModelConfig, str]:
    """A ModelConfig from a ModelConfig, a config dict, a directory, a config.json path or a hub id."""
    if isinstance(path_or_config, ModelConfig):
        return path_or_config, "<ModelConfig>"
    if isinstance(path_or_config, dict):
        return ModelConfig.from_dict(path_or_config), "<dict>"
    ref = os.fspath(path_or_config)
    if os.path.isdir(ref) or os.path.isfile(ref):
        return ModelConfig.from_json(ref), ref
    from minilora.io.hub import _looks_like_path, hub_offline

    if _looks_like_path(ref) or ref.endswith(".json"):
        raise FileNotFoundError(f"{ref}: no such directory or config.json")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        local = hf_hub_download(ref, "config.json", local_files_only=hub_offline())
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{ref!r} is not a local directory and its config.json is not in the Hugging Face cache "
            f"(offline={hub_offline()}): {e}"
        ) from e
    except HFValidationError as e:
        raise FileNotFoundError(f"{ref!r} is neither a directory, a config.json nor a valid hub id: {e}") from e
    with open(local, encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f), source=f"{ref} ({local})"), ref


# ---------------------------------------------------------------------------------------------- counting
def _group(name: str, module: nn.Module) -> str:
    if name.endswith("embed_tokens"):
        return "embeddings"
    if name == "lm_head" or name.endswith(".lm_head"):
        return "head"
    if ".self_attn." in f".{name}.":
        return "attention"
    if ".mlp." in f".{name}.":
        return "mlp"
    if "norm" in name.rsplit(".", 1)[-1]:
        return "norms"
    raise AssertionError(f"parameter of module {name!r} ({type(module).__name__}) fits no footprint group")


def _meta_model(config: ModelConfig) -> nn.Module:
    from minilora.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _fourbit_state_bytes(n: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of the quant state of one 4-bit weight of n elements (formats.md sections 1-2)."""
    n_blocks = -(-n // blocksize)
    if not double_quant:
        return n_blocks * 4 + NF4_CODE_BYTES
    n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
    return n_blocks + n_nested * 4 + NF4_CODE_BYTES + NESTED_CODE_BYTES + OFFSET_BYTES


def _transformers_buffer_bytes(config: ModelConfig, float_bytes: int) -> int:
    """The buffers of the transformers model: per RoPE table, inv_freq and original_inv_freq (float32,
    rotary_dim / 2 each; Gemma-3 has a global and a local table); Gemma's scalar embed_scale in the float dtype.
    """
    tables = 2 if config.rope_local_theta is not None else 1
    return tables * 2 * (config.rotary_dim // 2) * 4 + (float_bytes if config.scale_embeddings else 0)


def footprint(
    path_or_config: str | os.PathLike | ModelConfig | dict,
    lora_rank: int = 32,
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    blocksize: int = 64,
) -> Footprint:
    """The footprint of a config at fp32, bf16, int8, nf4, nf4+dq and nf4+dq with an fp32 LoRA adapter.

    Counts the parameters of minilora's decoder built on the meta device; allocates no weight memory.
    """
    config, source = load_config(path_or_config)
    if blocksize <= 0:
        raise ValueError(f"blocksize={blocksize} must be positive")
    model = _meta_model(config)

    seen: set[int] = set()
    group_params: Counter[str] = Counter()
    float_params: Counter[str] = Counter()  # params kept in float in the quantized lines, per group
    quantized: list[tuple[str, int, int]] = []  # (group, weight numel, out_features) of each decoder Linear
    lora_params = 0
    for name, module in model.named_modules():
        own = [(p, t) for p, t in module.named_parameters(recurse=False) if id(t) not in seen]
        if not own:
            continue
        group = _group(name, module)
        last = name.rsplit(".", 1)[-1]
        for p, tensor in own:
            seen.add(id(tensor))
            group_params[group] += tensor.numel()
            if isinstance(module, nn.Linear) and last in QUANTIZED_LINEARS and p == "weight":
                quantized.append((group, tensor.numel(), tensor.shape[0]))
            else:
                float_params[group] += tensor.numel()
        if isinstance(module, nn.Linear) and last in lora_targets:
            lora_params += lora_rank * (module.in_features + module.out_features)

    lines: list[FootprintLine] = []
    for name, (float_bytes, quant) in _PRECISIONS.items():
        counted: Counter[str] = Counter({g: n * float_bytes for g, n in float_params.items()})
        true: Counter[str] = Counter(counted)
        for group, n, out_features in quantized:
            if quant is None:
                counted[group] += n * float_bytes
                true[group] += n * float_bytes
            elif quant == "int8":
                counted[group] += n
                true[group] += n + out_features * 4  # SCB: one float32 absmax per row
            else:
                counted[group] += (n + 1) // 2  # packed: two codes per byte
                true[group] += (n + 1) // 2 + _fourbit_state_bytes(n, blocksize, quant == "nf4+dq")
        counted["buffers"] = true["buffers"] = _transformers_buffer_bytes(config, float_bytes)
        lines.append(_line(name, _DESCRIPTIONS[name], counted, true))
    if lora_params:
        base = lines[-1]
        counted = Counter(base.breakdown_transformers)
        true = Counter(base.breakdown_true)
        counted["lora"] = true["lora"] = lora_params * 4
        desc = f"NF4 + double quant + fp32 LoRA r={lora_rank} on {','.join(t.split('_')[0] for t in lora_targets)}"
        lines.append(_line("nf4+dq+lora", desc, counted, true))

    return Footprint(
        source=source,
        config=config,
        params=sum(group_params.values()),
        decoder_linear_params=sum(n for _, n, _ in quantized),
        group_params={g: group_params.get(g, 0) for g in GROUPS if g not in ("buffers", "lora")},
        lora_rank=lora_rank,
        lora_targets=tuple(lora_targets),
        lora_params=lora_params,
        blocksize=blocksize,
        lines=lines,
    )


def _line(name: str, description: str, counted: Counter[str], true: Counter[str]) -> FootprintLine:
    total = sum(counted.values())
    return FootprintLine(
        name=name,
        description=description,
        transformers_bytes=total,
        transformers_param_bytes=total - counted["buffers"],
        true_bytes=sum(true.values()),
        breakdown_transformers={g: counted.get(g, 0) for g in GROUPS},
        breakdown_true={g: true.get(g, 0) for g in GROUPS},
    )


# ---------------------------------------------------------------------------------------------- reports
def gb(nbytes: int) -> str:
    """Decimal gigabytes with three significant digits (32.1, 9.08, 5.59), or MB below 1 GB."""
    if nbytes >= 1e9:
        return f"{_sig3(nbytes / 1e9)} GB"
    return _fmt_bytes(nbytes)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def footprint_report(path_or_config: str | os.PathLike | ModelConfig | dict, **kwargs: object) -> str:
    """A markdown report of :func:`footprint`: one line per precision, then the per-module breakdown."""
    fp = footprint(path_or_config, **kwargs)  # type: ignore[arg-type]
    c = fp.config
    head = "tied to the embeddings" if c.tie_word_embeddings else "untied"
    out = [
        f"# Memory footprint of {fp.source}",
        "",
        f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
        f"{c.num_attention_heads}/{c.num_key_value_heads} heads (head_dim {c.head_dim}), vocab {c.vocab_size}, "
        f"head {head}, rope {c.rope_type}.",
        f"{fp.params:,} parameters, {fp.decoder_linear_params:,} of them in the decoder Linears "
        f"(quantized in the int8/nf4 lines, blocksize {fp.blocksize}); "
        f"LoRA r={fp.lora_rank} on {','.join(fp.lora_targets)}: {fp.lora_params:,} parameters.",
        "",
    ]
    rows = [
        [
            line.name,
            line.description,
            gb(line.transformers_param_bytes),
            f"{line.transformers_param_bytes:,}",
            gb(line.true_bytes),
            f"{line.true_bytes:,}",
            f"+{line.true_bytes - line.transformers_bytes:,}",
        ]
        for line in fp.lines
    ]
    out.append(
        _table(
            ["line", "storage", "transformers count", "bytes", "true", "true bytes", "quant state (uncounted)"],
            rows,
        )
    )
    buffers = fp.lines[0].breakdown_transformers["buffers"]
    out += [
        "",
        "transformers count = bytes of the parameters as transformers + bitsandbytes hold them (4-bit weights "
        "by their packed bytes; absmax, nested absmax, code tables and SCB not counted); "
        f"get_memory_footprint() also adds {buffers:,} B of RoPE buffers. "
        "true = every byte, quant state included (the RoPE buffers too).",
        "",
        "## Per module (true bytes)",
        "",
    ]
    groups = [g for g in GROUPS if any(line.breakdown_true[g] for line in fp.lines)]
    rows = []
    for g in groups:
        params = fp.group_params.get(g, fp.lora_params if g == "lora" else 0)
        rows.append(
            [g, f"{params:,}"]
            + [_fmt_bytes(line.breakdown_true[g]) if line.breakdown_true[g] else "-" for line in fp.lines]
        )
    out.append(_table(["module", "params"] + [line.name for line in fp.lines], rows))
    return "\n".join(out) + "\n"


def describe(model: nn.Module, max_depth: int = 8) -> str:
    """The module tree with parameter counts and bytes (true bytes: parameters and buffers).

    A quantized Linear counts its out x in weight elements as parameters and its packed bytes plus quant
    state as bytes. Each line counts the unique tensors under that module (a tied head shows the shared matrix). A
    ModuleList of identical children prints its first child only, as ``(0-29): 30 x DecoderLayer``.
    """
    from minilora.nn import QuantizedLinear

    lines: list[str] = []

    def size(module: nn.Module) -> tuple[int, int]:
        params = list(module.parameters())
        tensors = params + list(module.buffers())
        # a quantized weight is a buffer, but still out x in parameters of the model
        quantized = sum(m.out_features * m.in_features for m in module.modules() if isinstance(m, QuantizedLinear))
        return sum(t.numel() for t in params) + quantized, sum(t.numel() * t.element_size() for t in tensors)

    def walk(name: str, module: nn.Module, depth: int, repeat: int = 1) -> None:
        params, nbytes = size(module)
        extra = module.extra_repr()
        label = f"{type(module).__name__}({extra})" if extra and len(extra) < 100 else type(module).__name__
        each = "each " if repeat > 1 else ""
        lines.append(f"{'  ' * depth}({name}): {label}  [{each}{params:,} params, {_fmt_bytes(nbytes)}]")
        if depth >= max_depth:
            return
        children = list(module.named_children())
        if isinstance(module, nn.ModuleList) and len(children) > 1 and len({repr(c) for _, c in children}) == 1:
            walk(f"0-{len(children) - 1}", children[0][1], depth + 1, repeat=len(children))
            return
        for child_name, child in children:
            walk(child_name, child, depth + 1)

    walk(type(model).__name__, model, 0)
    return "\n".join(lines) + "\n"


def _fmt_bytes(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{_sig3(nbytes / scale)} {unit}"
    return f"{nbytes} B"


def _sig3(x: float) -> str:
    """Three significant digits, trailing zeros kept: 32.1, 9.08, 5.70, 755."""
    return f"{x:.0f}" if x >= 99.95 else f"{x:.1f}" if x >= 9.995 else f"{x:.2f}"
