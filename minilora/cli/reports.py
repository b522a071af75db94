"""The commands that print a report: ``footprint`` (memory, minilora.memory and minilora.memory_train),
``explain`` (the math at a model's sizes, minilora.explain) and ``bench`` (the benchmarks of a source
checkout). Each command is its ``cmd_`` function and its parser block; minilora.cli puts them together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minilora.cli.common import echo, find_model
from minilora.errors import CLIError


def cmd_footprint(args: argparse.Namespace) -> None:
    try:
        from minilora.memory import footprint_report
    except ImportError as e:
        raise CLIError(f"footprint is not available: minilora.memory could not be imported ({e})") from e
    target = args.model
    path = Path(target)
    if not (path.is_dir() or path.is_file()) and (target in ("default", "") or target.endswith(".gguf")):
        target = str(find_model(target))
    if not args.train:
        echo(footprint_report(target))
        return
    import torch

    from minilora.memory_train import TrainSetup, expand_targets, train_footprint_report

    setup = TrainSetup(
        r=args.r,
        targets=expand_targets(args.targets),
        batch=args.batch,
        seq=args.seq,
        gradient_checkpointing=args.gradient_checkpointing,
        quantize=args.quantize,
        dtype=getattr(torch, args.dtype),  # float32 or bfloat16 (argparse choices)
    )
    echo(train_footprint_report(target, setup))


def cmd_bench(args: argparse.Namespace) -> int | None:
    import importlib.util
    import subprocess

    # The benchmarks package lives in a source checkout (the current directory), not in the wheel.
    if importlib.util.find_spec("benchmarks") is None and not Path("benchmarks/run.py").is_file():
        raise CLIError("bench needs the benchmarks package of a source checkout: run it from the repository root")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.bench_args], check=False).returncode


def cmd_explain(args: argparse.Namespace) -> None:
    from minilora.explain.command import run_explain

    echo(run_explain(args).rstrip("\n"))


# ---------------------------------------------------------------------------------------------- parsers
# One add_parser + add_argument block per command: alike in shape, each the documentation of its command.
def add_footprint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "footprint",
        help="memory footprint of a model in fp32 / bf16 / int8 / NF4 (+ LoRA)",
        description="Print the footprint table of minilora.memory.footprint_report for a model or config.json.",
    )
    p.add_argument("model", help="model directory, config.json, hub id, .gguf file or 'default'")
    p.add_argument("--train", action="store_true", help="the peak of a (Q)LoRA training step, per item")
    p.add_argument("--r", type=int, default=32, help="with --train: LoRA rank (default 32)")
    p.add_argument("--targets", default="q,k,v,o", help="with --train: q,k,v,o,gate,up,down or all (default q,k,v,o)")
    p.add_argument("--batch", type=int, default=4, help="with --train: sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=182, help="with --train: tokens per sequence (default 182)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="with --train: recompute layers")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "none"), help="with --train: base format")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="with --train: compute dtype")
    p.set_defaults(func=cmd_footprint)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run the benchmarks (benchmarks.run)",
        description="Run benchmarks.run.main with the remaining arguments (from a source checkout).",
        add_help=True,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks.run")
    p.set_defaults(func=cmd_bench)


def add_explain(sub: argparse._SubParsersAction) -> None:
    from minilora.explain.command import add_explain_parser

    add_explain_parser(sub).set_defaults(func=cmd_explain)
