"""The benchmark runner: `python -m benchmarks <suite> [--smoke] [--out DIR]` (or `minilora bench ...`).

CPU suites (each writes benchmarks/results/<suite>-cpu.md and .json, plus PNG figures):
- quant:   quantize / dequantize NF4+DQ of Llama-3.1-8B-sized weights, minilora vs bitsandbytes
- quality: quantization error on Gaussian and SmolLM2-135M weights, and SmolLM2 perplexity per precision
- speed:   4-bit linear forward+backward; a QLoRA training step on SmolLM2 vs transformers+bnb+peft
- loading: load + quantize to NF4 a >1 GB checkpoint: time and peak RSS vs transformers+bnb
`all` runs the four one after the other. `--smoke` runs tiny shapes in seconds and writes to a
temporary directory unless --out is given (it never writes into benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

SUITES = ("quant", "quality", "speed", "loading")
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=(*SUITES, "all"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; results to a temp dir")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace) -> Path:
    """--out if given; else a fresh temporary directory for --smoke, benchmarks/results/ otherwise."""
    if args.out is not None:
        return args.out
    if args.smoke:
        return Path(tempfile.mkdtemp(prefix="minilora-bench-smoke-"))
    return RESULTS


def main(argv: list[str]) -> int:
    """Run one suite (or all); return a process exit code."""
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = output_dir(args)
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
        module = importlib.import_module(f"benchmarks.cpu.{suite}")
        md, js = module.run(argv=argv, out=out, smoke=args.smoke)
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
