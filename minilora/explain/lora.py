"""`minilora explain lora`: the parameter and byte arithmetic of a LoRA config on a model, its scale, and what
merging it into a 4-bit base does (LoRA section 4.1, rsLoRA, QLoRA section 3).

A LoRA on a Linear [out, in] adds A [r, in] and B [out, r]: r * (in + out) parameters. The counts come from
minilora itself: the decoder is built on the meta device (no memory), `add_lora` wraps the targets, and
`trainable_parameters_report` / `adapter_nbytes` count them as peft does (for Llama-3.1-8B, r=32 on q,k,v,o:
27,262,976 trainable parameters, 109,051,904 bytes in float32). The adapter file's size adds the safetensors
header, computed here from the tensor names and shapes.

Merging into a 4-bit base (LoRALinear.merge): W4 is dequantized, s * B A added, and the sum quantized again.
The requantization rounds the update to the NF4 grid of each block: an update much smaller than a grid step
mostly vanishes. measure_merge shows it on a real weight for a few update sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from minilora.lora import LoRALinear, adapter_nbytes, adapter_state_dict, add_lora, lora_layers
from minilora.lora import trainable_parameters_report as peft_line
from minilora.models.config import ModelConfig
from minilora.quant.state import dtype_name

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class ModuleLoRA:
    """The adapters on one kind of module (e.g. every q_proj)."""

    name: str
    in_features: int
    out_features: int
    count: int  # how many modules of this kind got an adapter
    r: int

    @property
    def params_each(self) -> int:
        return self.r * (self.in_features + self.out_features)

    @property
    def params(self) -> int:
        return self.count * self.params_each


@dataclass
class LoRAArithmetic:
    r: int
    alpha: float
    targets: tuple[str, ...]
    modules: list[ModuleLoRA]
    trainable: int
    report_line: str  # peft's print_trainable_parameters line
    adapter_bytes: int  # tensor payload in the adapter dtype
    adapter_file_bytes: int  # adapter_model.safetensors: 8 + header + payload
    dtype: torch.dtype

    @property
    def scaling(self) -> float:
        return self.alpha / self.r  # LoRA section 4.1

    @property
    def rslora_scaling(self) -> float:
        return self.alpha / math.sqrt(self.r)  # rsLoRA (Kalajdzievski 2023)


def safetensors_file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """The size of the file safetensors writes for `tensors`: 8-byte length, JSON header padded with spaces
    to a multiple of 8, then the data (sorted by dtype, then name). Works on meta tensors."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    n = len(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    return 8 + n + (-n) % 8 + offset


def meta_model(config: ModelConfig) -> nn.Module:
    """minilora's decoder for `config` on the meta device: every module and shape, no memory."""
    from minilora.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def lora_arithmetic(
    config: ModelConfig,
    r: int = 32,
    alpha: float = 64,
    targets: tuple[str, ...] | str = ATTN,
    dtype: torch.dtype = torch.float32,
) -> LoRAArithmetic:
    """Counts and bytes of LoRA (r, alpha, targets) on the model of `config`, from minilora's own LoRA code."""
    model = meta_model(config)
    target_modules = targets if isinstance(targets, str) else list(targets)
    add_lora(model, r=r, alpha=alpha, target_modules=target_modules, adapter_dtype=dtype)
    kinds: dict[str, ModuleLoRA] = {}
    for name, layer in lora_layers(model):
        assert isinstance(layer, LoRALinear)
        kind = name.rsplit(".", 1)[-1]
        key = f"{kind} [{layer.out_features}, {layer.in_features}]"
        if key not in kinds:
            kinds[key] = ModuleLoRA(kind, layer.in_features, layer.out_features, 0, r)
        kinds[key].count += 1
    tensors = adapter_state_dict(model)
    return LoRAArithmetic(
        r=r,
        alpha=alpha,
        targets=tuple(targets) if not isinstance(targets, str) else (targets,),
        modules=list(kinds.values()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        report_line=peft_line(model),
        adapter_bytes=adapter_nbytes(model),
        adapter_file_bytes=safetensors_file_size(tensors, {"format": "pt"}),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------- merging
@dataclass
class MergeMeasurement:
    """One merge of s * B A into a 4-bit base, measured (all errors relative, Frobenius)."""

    delta_rel: float  # ||s B A|| / ||W||: the size of the update
    base_error: float  # ||deq(W4) - W|| / ||W||: what 4-bit costs before any merge
    merge_error: float  # ||deq(requant(deq(W4) + sBA)) - (deq(W4) + sBA)|| / ||deq(W4) + sBA|| (MergeReport)
    merge_max_abs: float
    change_ratio: float  # ||deq(merged) - deq(W4)|| / ||sBA||: how far the 4-bit weight moved, per unit of update
    delta_cosine: float  # cosine between that realised update and s B A
    output_rel_diff: float  # ||y_merged - y_unmerged|| / ||y_unmerged|| on random inputs


@torch.no_grad()
def measure_merge(
    weight: torch.Tensor,
    r: int = 16,
    alpha: float = 32,
    delta_rels: tuple[float, ...] = (0.001, 0.01, 0.1),
    quant_type: str = "nf4",
    seed: int = 0,
) -> list[MergeMeasurement]:
    """Merge LoRA updates of several sizes into `weight` quantized to 4-bit, and measure what it costs."""
    from minilora.kernels import reference_mode
    from minilora.nn import Linear4bit

    w = weight.detach().float()
    gen = torch.Generator().manual_seed(seed)
    results = []
    with reference_mode():
        base = Linear4bit.from_weight(w, quant_type=quant_type, compress_statistics=True)
        w4 = base.dequantize().float()
        x = torch.randn(64, w.shape[1], generator=gen)
        for delta_rel in delta_rels:
            layer = LoRALinear(base, r, alpha)
            layer.lora_B["default"].weight.copy_(torch.randn(w.shape[0], r, generator=gen))
            delta = layer.lora_delta("default").float()
            layer.lora_B["default"].weight.mul_(delta_rel * w.norm() / delta.norm())
            delta = layer.lora_delta("default").float()  # (out, in), = s B A
            y_unmerged = layer(x)
            report = layer.merge(module_name="explain")
            y_merged = layer(x)
            realised = layer.base_layer.dequantize().float() - w4
            results.append(
                MergeMeasurement(
                    delta_rel=float(delta.norm() / w.norm()),
                    base_error=float((w4 - w).norm() / w.norm()),
                    merge_error=report.rel_error,
                    merge_max_abs=report.max_abs_error,
                    change_ratio=float(realised.norm() / delta.norm()),
                    delta_cosine=float(
                        torch.nn.functional.cosine_similarity(realised.reshape(1, -1), delta.reshape(1, -1))
                    ),
                    output_rel_diff=float((y_merged - y_unmerged).norm() / y_unmerged.norm()),
                )
            )
    return results


def lora_text(a: LoRAArithmetic, source: str, merges: list[MergeMeasurement] | None = None, key: str = "") -> str:
    dtype = dtype_name(a.dtype)
    out = [
        f"# LoRA r={a.r}, alpha={a.alpha:g} on {','.join(a.targets)} of {source}",
        "",
        "Each adapted Linear [out, in] gains A [r, in] and B [out, r]: r x (in + out) parameters.",
        "",
        "| module [out, in] | count | r x (in + out) each | total |",
        "|---|---:|---:|---:|",
    ]
    for m in a.modules:
        out.append(f"| {m.name} [{m.out_features}, {m.in_features}] | {m.count} | {m.params_each:,} | {m.params:,} |")
    out += [
        f"| **total** | {sum(m.count for m in a.modules)} | | **{a.trainable:,}** |",
        "",
        a.report_line,
        f"adapter tensors in {dtype}: {a.adapter_bytes:,} B ({a.adapter_bytes / 1e6:.0f} MB); "
        f"adapter_model.safetensors: {a.adapter_file_bytes:,} B (with its header)",
        "",
        f"scale: alpha / r = {a.alpha:g} / {a.r} = {a.scaling:g} (LoRA); "
        f"rsLoRA: alpha / sqrt(r) = {a.rslora_scaling:.6g}",
        "(y = W x + scale * B A x; dividing by r keeps the update's size roughly independent of the rank, rsLoRA's "
        "sqrt(r) keeps high ranks learning)",
    ]
    if merges:
        out += [
            "",
            f"## Merging into a 4-bit (NF4 + double quant) base: {key}",
            "",
            "merged = quantize(dequantize(W4) + s B A): the update is rounded to each block's NF4 grid.",
            "",
            "| update size vs W | 4-bit base error | merge error | weight change / update | cosine(change, sBA) "
            "| output change |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for m in merges:
            out.append(
                f"| {m.delta_rel:.3g} | {m.base_error:.4f} | {m.merge_error:.4f} | {m.change_ratio:.3f} | "
                f"{m.delta_cosine:.3f} | {m.output_rel_diff:.4f} |"
            )
        out += [
            "",
            "merge error = requantization error relative to the merged float weight (LoRALinear.merge's MergeReport); "
            "weight change = ||deq(merged) - deq(W4)|| (its cosine with s B A says how much of it is the update and "
            "how much rounding noise); output change = merged vs unmerged layer on random inputs. "
            "An update far below the 4-bit step is mostly lost or replaced by rounding noise: keep the adapter "
            "unmerged on a 4-bit base, or merge into a float copy (minilora merge).",
        ]
    return "\n".join(out) + "\n"


def plot_lora(a: LoRAArithmetic, merges: list[MergeMeasurement] | None, directory: str) -> list[str]:
    """lora_params.png (adapter parameters per module kind) and, with merges, lora_merge.png."""
    from minilora.explain.plots import new_figure, save

    fig, axes = new_figure(1, 1, (7, 4))
    ax = axes[0]
    ax.bar([f"{m.name}\n[{m.out_features}x{m.in_features}]" for m in a.modules], [m.params for m in a.modules])
    ax.set_ylabel("LoRA parameters")
    ax.set_title(f"r={a.r} on {','.join(a.targets)}: {a.trainable:,} trainable")
    paths = [save(fig, directory, "lora_params.png")]
    if merges:
        fig, axes = new_figure(1, 1, (7, 4))
        ax = axes[0]
        sizes = [m.delta_rel for m in merges]
        ax.plot(sizes, [m.change_ratio for m in merges], "o-", label="weight change / update")
        ax.plot(sizes, [m.delta_cosine for m in merges], "s-", label="cosine(change, sBA)")
        ax.set_xscale("log")
        ax.set_xlabel("||s B A|| / ||W||")
        ax.set_title("merging into NF4: how much of the update survives")
        ax.legend()
        paths.append(save(fig, directory, "lora_merge.png"))
    return paths
