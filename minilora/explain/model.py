"""`minilora explain model`: where a model's memory goes, per module type and per storage format.

The figures are minilora.memory's footprint (from the config alone, on the meta device; formats.md section 4):
for each line (fp32, bf16, int8, nf4, nf4+dq, nf4+dq+lora) the bytes of each group of modules, as transformers
counts them and as they truly are (quant state included). Added here: how the decoder Linears, the part that
4-bit quantization shrinks, split into the seven projections.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from minilora.memory import GROUPS, QUANTIZED_LINEARS, Footprint, _fmt_bytes, footprint
from minilora.models.config import ModelConfig


@dataclass
class ModelMemory:
    source: str
    footprint: Footprint
    projection_params: dict[str, int]  # q_proj .. down_proj: weight parameters over all layers


def explain_model(
    config: ModelConfig, lora_rank: int = 32, lora_targets: tuple[str, ...] | None = None, source: str = "the model"
) -> ModelMemory:
    """minilora.memory.footprint of `config`, plus the parameters of each decoder projection."""
    from minilora.explain.lora import meta_model

    kwargs = {} if lora_targets is None else {"lora_targets": tuple(lora_targets)}
    fp = footprint(config, lora_rank=lora_rank, **kwargs)
    params: Counter[str] = Counter()
    for name, module in meta_model(config).named_modules():
        kind = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and kind in QUANTIZED_LINEARS:
            params[kind] += module.weight.numel()
    return ModelMemory(source, fp, {k: params[k] for k in QUANTIZED_LINEARS if k in params})


def model_text(m: ModelMemory) -> str:
    fp = m.footprint
    groups = [g for g in GROUPS if any(line.breakdown_true[g] for line in fp.lines)]
    out = [
        f"# Where the memory of {m.source} goes",
        "",
        f"{fp.params:,} parameters; {fp.decoder_linear_params:,} ({fp.decoder_linear_params / fp.params:.1%}) in the "
        "decoder Linears, the ones int8/NF4 quantize (minilora.memory.footprint).",
        "",
        "## True bytes per module type and format (quant state included)",
        "",
        "| module | params | " + " | ".join(line.name for line in fp.lines) + " |",
        "|---|---:|" + "---:|" * len(fp.lines),
    ]
    for g in groups:
        params = fp.group_params.get(g, fp.lora_params if g == "lora" else 0)
        cells = [_fmt_bytes(line.breakdown_true[g]) if line.breakdown_true[g] else "-" for line in fp.lines]
        out.append(f"| {g} | {params:,} | " + " | ".join(cells) + " |")
    out.append("| **total** | | " + " | ".join(f"**{_fmt_bytes(line.true_bytes)}**" for line in fp.lines) + " |")
    out.append(
        "| transformers count | | " + " | ".join(_fmt_bytes(line.transformers_bytes) for line in fp.lines) + " |"
    )
    out += [
        "",
        "## The decoder Linears by projection",
        "",
        "| projection | params | share of the model |",
        "|---|---:|---:|",
    ]
    for kind, n in m.projection_params.items():
        out.append(f"| {kind} | {n:,} | {n / fp.params:.1%} |")
    out += [
        "",
        "The transformers count is what get_memory_footprint() reports (4-bit weights by their packed bytes only); the "
        "true bytes add absmax, nested absmax, code tables and SCB. `minilora footprint` prints the full table.",
    ]
    return "\n".join(out) + "\n"


def plot_model(m: ModelMemory, directory: str) -> list[str]:
    """model_memory.png: one stacked bar per format, a segment per module type."""
    from minilora.explain.plots import new_figure, save

    fp = m.footprint
    fig, axes = new_figure(1, 1, (8, 4.5))
    ax = axes[0]
    names = [line.name for line in fp.lines]
    bottom = [0.0] * len(names)
    for g in GROUPS:
        heights = [line.breakdown_true[g] / 1e6 for line in fp.lines]
        if any(heights):
            ax.bar(names, heights, bottom=bottom, label=g)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("MB (true bytes)")
    ax.set_title(f"memory of {fp.config.model_type} ({fp.params / 1e6:.0f}M params) per format")
    ax.legend()
    return [save(fig, directory, "model_memory.png")]
