"""The `minilora explain quant|lora|model` command line: its parser and what it prints (cli/reports.py wires it in).

    minilora explain quant [MODEL] [--tensor KEY] [--block N] [--type nf4|fp4] [--blocksize 64] [--plot DIR]
    minilora explain lora  [MODEL] [--r 32] [--alpha 64] [--targets q_proj,k_proj,v_proj,o_proj] [--no-merge]
    minilora explain model [MODEL] [--plot DIR]

MODEL: "default" (the shipped SmolLM2-135M-Instruct GGUF), a .gguf file, a transformers directory, a hub id,
or (lora, model) a config.json. --plot DIR writes quant_histogram.png, quant_error.png / lora_params.png,
lora_merge.png / model_memory.png.
"""

from __future__ import annotations

import argparse

from minilora.explain.source import DEFAULT_WEIGHT, open_model

ATTN = "q_proj,k_proj,v_proj,o_proj"


def add_explain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain",
        help="show QLoRA on a real model: a block through NF4, LoRA arithmetic, where memory goes",
        description="Print, step by step, what minilora computes: `quant` (one block of a weight through NF4, "
        "and the layer in NF4/FP4/int4), `lora` (parameters, bytes, scale of a LoRA config, and merging into 4-bit), "
        "`model` (memory per module type and format). --plot DIR also writes PNGs.",
    )
    p.add_argument("what", choices=("quant", "lora", "model"), help="what to explain")
    p.add_argument("model", nargs="?", default="default", help="model (default: the shipped SmolLM2 GGUF)")
    p.add_argument("--tensor", default=DEFAULT_WEIGHT, help=f"weight to use (default {DEFAULT_WEIGHT})")
    p.add_argument("--block", type=int, default=0, help="quant: which block of the weight (default 0)")
    p.add_argument("--type", default="nf4", choices=("nf4", "fp4"), help="quant: the block's 4-bit type")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--r", type=int, default=32, help="lora: rank (default 32)")
    p.add_argument("--alpha", type=float, default=64, help="lora: alpha (default 64)")
    p.add_argument("--targets", default=ATTN, help=f"lora: comma-separated modules or all-linear (default {ATTN})")
    p.add_argument("--no-merge", action="store_true", help="lora: skip the 4-bit merge measurement (no weights read)")
    p.add_argument("--plot", metavar="DIR", help="also write the PNGs into DIR (needs matplotlib)")
    return p


def run_explain(args: argparse.Namespace) -> str:
    """The text `minilora explain` prints (and the PNGs it writes with --plot)."""
    from minilora.explain import lora, model, quant

    source = open_model(args.model)
    plots: list[str] = []
    if args.what == "quant":
        weight = source.weight(args.tensor)
        block = quant.explain_block(weight, args.block, args.type, args.blocksize, key=args.tensor)
        layer = quant.explain_layer(weight, args.blocksize, key=args.tensor)
        text = quant.block_text(block) + "\n" + quant.layer_text(layer)
        if args.plot:
            plots = quant.plot_layer(layer, args.plot)
    elif args.what == "lora":
        targets = "all-linear" if args.targets == "all-linear" else tuple(t for t in args.targets.split(",") if t)
        arithmetic = lora.lora_arithmetic(source.config, args.r, args.alpha, targets)
        merges = None
        if not args.no_merge and source.keys:
            merges = lora.measure_merge(source.weight(args.tensor), r=args.r, alpha=args.alpha)
        text = lora.lora_text(arithmetic, source.name, merges, key=args.tensor)
        if args.plot:
            plots = lora.plot_lora(arithmetic, merges, args.plot)
    else:
        memory = model.explain_model(source.config, source=source.name)
        text = model.model_text(memory)
        if args.plot:
            plots = model.plot_model(memory, args.plot)
    if plots:
        text += "\nplots: " + ", ".join(plots) + "\n"
    return text
