"""The benchmark runner: `python -m benchmarks <suite> [--smoke] [--out DIR]` (or `minilora bench ...`).

CPU suites (each writes benchmarks/results/<suite>-cpu.md and .json, plus PNG figures):
- quant:   quantize / dequantize NF4+DQ of Llama-3.1-8B-sized weights, minilora vs bitsandbytes
- quality: quantization error on Gaussian and SmolLM2-135M weights, and SmolLM2 perplexity per precision
- speed:   4-bit linear forward+backward; a QLoRA training step on SmolLM2 vs transformers+bnb+peft
- loading: load + quantize to NF4 a >1 GB checkpoint: time and peak RSS vs transformers+bnb
- generate: greedy generation on SmolLM2-135M, fp32 and NF4+DQ, vs transformers (+ bitsandbytes)
- tokenizers: tokens per product description / price / demo example for each family's tokenizer here,
  and what they cost in training (logits memory, a QLoRA step at that length)
`all` runs the six one after the other. `--smoke` runs tiny shapes in seconds and writes to a
temporary directory unless --out is given (it never writes into benchmarks/results/).

`--device cuda` runs the same suites on a CUDA GPU and writes `<suite>-<gpu>.md/.json` (e.g. quality-h200.md):
tensors and models on the GPU, every timed call synchronized, peak memory from torch.cuda.max_memory_allocated
instead of the process RSS. Parts that need the SmolLM2 checkpoint are skipped, and say so, where it is not
installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

SUITES = ("quant", "quality", "speed", "loading", "generate", "tokenizers", "train_memory")
DEVICES = ("cpu", "cuda")
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=(*SUITES, "all"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; results to a temp dir")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where tensors and models live")
    return parser.parse_args(argv)


def device_error(device: str) -> str | None:
    """Why `device` cannot run the suites here, or None when it can."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return (
            f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); run on a GPU machine or use --device cpu"
        )
    return None


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
    error = device_error(args.device)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = output_dir(args)
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
        module = importlib.import_module(f"benchmarks.cpu.{suite}")
        md, js = module.run(argv=argv, out=out, smoke=args.smoke, device=args.device)
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
