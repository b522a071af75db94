"""The benchmark runner: `python -m benchmarks SUITE [SUITE ...] [--smoke] [--out DIR]` (or `minilora bench ...`).

CPU suites (each writes benchmarks/results/<suite>-cpu.md and .json, plus PNG figures):
- quant:   quantize / dequantize NF4+DQ of Llama-3.1-8B-sized weights, minilora vs bitsandbytes
- quality: quantization error on Gaussian and SmolLM2-135M weights, and SmolLM2 perplexity per precision
- speed:   4-bit linear forward+backward; a QLoRA training step on SmolLM2 vs transformers+bnb+peft
- loading: load + quantize to NF4 a >1 GB checkpoint: time and peak RSS vs transformers+bnb
- generate: greedy generation on SmolLM2-135M, fp32 and NF4+DQ, vs transformers (+ bitsandbytes)
- tokenizers: tokens per product description / price / demo example for each family's tokenizer here,
  and what they cost in training (logits memory, a QLoRA step at that length)
- train_memory: minilora.memory_train's training-step estimate against the measured growth
`all` runs the CPU suites one after the other. `--smoke` runs tiny shapes in seconds and writes to a
temporary directory unless --out is given (it never writes into benchmarks/results/).

`--device cuda` runs the same suites on a CUDA GPU and writes `<suite>-<gpu>.md/.json` (e.g. quality-h200.md):
tensors and models on the GPU, every timed call synchronized, peak memory from torch.cuda.max_memory_allocated
instead of the process RSS. Parts that need the SmolLM2 checkpoint are skipped, and say so, where it is not
installed.

GPU suites (Llama-3.1-8B shapes, random weights; need CUDA, triton, bitsandbytes, transformers, peft): each runs
as `python -m benchmarks.gpu.<module> --out DIR [its own flags]` in a child process of its own, killed after
`--timeout` seconds, its output saved to DIR/<suite>.log. Flags this runner does not know go to the GPU suites.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

SUITES = ("quant", "quality", "speed", "loading", "generate", "tokenizers", "train_memory")
GPU_SUITES = {  # suite name -> (module in benchmarks/gpu/, what it measures)
    "kernels": ("bench_kernels", "NF4+DQ dequantize and the 4-bit linear vs bitsandbytes -> kernels-h200.*"),
    "decode": ("bench_decode", "the 4-bit GEMV kernel at M = 1..16 vs bitsandbytes -> decode-h200.*"),
    "qlora": ("qlora_step", "the QLoRA step vs transformers + bitsandbytes + peft -> qlora-h200.*"),
    "train_graph": ("train_graph", "minilora.train.train eager vs cuda_graph=True -> train-graph-h200.*"),
    "train_default": ("train_default", "minilora.train.train as it comes vs the reference -> train-default-<card>.*"),
    "decode_default": ("decode_default", "batch-1 minilora.generate vs transformers -> decode-default-<card>.*"),
    "train_memory_gpu": ("train_memory", "memory_train's estimate vs max_memory_allocated -> train-memory-<card>.*"),
}
DEVICES = ("cpu", "cuda")
RESULTS = Path(__file__).resolve().parent / "results"


def epilog() -> str:
    lines = ["GPU suites:"] + [f"  {name:<17} {what}" for name, (_, what) in GPU_SUITES.items()]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    """The runner's arguments; flags it does not know are kept in `.extra` for the GPU suites."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "suite",
        nargs="+",
        choices=(*SUITES, "all", *GPU_SUITES),
        metavar="SUITE",
        help=f"CPU: {', '.join(SUITES)}, all (the CPU suites); GPU: see below",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; results to a temp dir")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where tensors and models live")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per GPU suite (default 600)")
    args, extra = parser.parse_known_args(argv)
    gpu = [s for s in args.suite if s in GPU_SUITES]
    if extra and not gpu:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (only the GPU suites take flags of their own)")
    if gpu and args.smoke:
        parser.error(f"--smoke is for the CPU suites; {', '.join(gpu)} run(s) only at full size on a GPU")
    args.extra = extra
    return args


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
    """Run the suites named in `argv`, one after the other; return a process exit code."""
    from benchmarks.harness import run_script

    args = parse(argv)
    gpu = [s for s in args.suite if s in GPU_SUITES]
    error = device_error("cuda" if gpu else args.device)
    if error is not None:
        if gpu:
            error = f"GPU suite(s) {', '.join(gpu)} need a CUDA device: " + error.split(": ", 1)[1]
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = output_dir(args)
    suites = [s for name in args.suite for s in (SUITES if name == "all" else (name,))]
    failed = []
    for suite in suites:
        if suite in GPU_SUITES:
            module = f"benchmarks.gpu.{GPU_SUITES[suite][0]}"
            code = run_script(module, ["--out", str(out), *args.extra], args.timeout, out / f"{suite}.log")
            print(f"{suite}: exit {code}; log {out / f'{suite}.log'}", file=sys.stderr)
            if code != 0:
                failed.append(suite)
            continue
        module = importlib.import_module(f"benchmarks.cpu.{suite}")
        md, js = module.run(argv=argv, out=out, smoke=args.smoke, device=args.device)
        print(f"wrote {md} and {js}", file=sys.stderr)
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
