"""Merging an adapter into a 4-bit (or 8-bit) base, and what it costs, layer by layer.

A QLoRA adapter was trained against dequant(Q(W)). Merging it into a quantized base means

    W_merged = dequant(Q(W)) + s B A        (float32, exact)
    W_stored = dequant(Q(W_merged))         (requantized: the blocks' absmax and codes all move)

and the error the requantization introduces, per layer, is reported against the float merge:
    max_abs_error = max |W_stored - W_merged|,  rel_error = ||W_stored - W_merged||_F / ||W_merged||_F.
The adapter's update s B A is usually far below one NF4 step, so much of it can round away (peft issue
2321). The safer options, in `merge(model, how=...)`:

    "requantize"  merge and requantize in place (smallest model, lossy: see the report)
    "bf16"        a bfloat16 model with the merged weights (exact up to bf16 rounding, 4x the bytes)
    "keep"        leave the adapter unmerged (exact; the report says what merging would have cost)
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.errors import AdapterError
from minilora.lora.api import lora_layers, merge_adapters, merge_and_unload
from minilora.lora.layer import MergeReport

MERGE_MODES = ("requantize", "bf16", "keep")


@torch.no_grad()
def requantization_report(model: nn.Module, adapter_name: str | None = None) -> list[MergeReport]:
    """What merging `adapter_name` (default: active) into each quantized base would cost; the model is unchanged."""
    reports = []
    for path, layer in lora_layers(model):
        name = adapter_name or layer.active_adapter
        if not layer.quantized or name not in layer.lora_A:
            continue
        dequantized = layer.base_layer.dequantize()
        target = layer.merged_weight(dequantized.to(torch.float32), name)  # (out, in)
        stored = layer.base_layer.requantize(target.to(dequantized.dtype), None)
        error = stored.dequantize().to(torch.float32) - target
        reports.append(
            MergeReport(
                path,
                name,
                quantized=True,
                max_abs_error=error.abs().max().item(),
                rel_error=(torch.linalg.norm(error) / torch.linalg.norm(target)).item(),
            )
        )
    return reports


def format_report(reports: list[MergeReport]) -> str:
    """A table, one line per layer, worst last: module, max |error|, relative error."""
    lines = [f"{'module':<48} {'max_abs_error':>14} {'rel_error':>10}"]
    for r in sorted(reports, key=lambda r: r.rel_error):
        lines.append(f"{r.module:<48} {r.max_abs_error:>14.3e} {r.rel_error:>10.3e}")
    return "\n".join(lines)


def merge(
    model: nn.Module, how: str = "requantize", adapter_name: str | None = None
) -> tuple[nn.Module, list[MergeReport]]:
    """Merge by `how` (see the module docstring); returns the model and the per-layer requantization report."""
    if how not in MERGE_MODES:
        raise AdapterError(f"merge how={how!r}: use one of {MERGE_MODES}")
    if how == "requantize":
        return model, merge_adapters(model, adapter_name)
    reports = requantization_report(model, adapter_name)
    if how == "bf16":
        return merge_and_unload(model, dtype=torch.bfloat16).to(torch.bfloat16), reports
    return model, reports
