"""The training commands: ``minilora demo`` (the main job, minilora_demo.price) and ``minilora finetune``
(your data, minilora.finetune). Each command is its ``cmd_`` function and its parser block; minilora.cli
puts them together.
"""

from __future__ import annotations

import argparse
import os

from minilora.cli.common import echo, find_model

ATTN = "q_proj,k_proj,v_proj,o_proj"
ALL7 = ATTN + ",gate_proj,up_proj,down_proj"


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
            echo(f"other processes keep {os.getloadavg()[0]:.1f} cores busy: using {free} thread(s) (--threads N)")
            torch.set_num_threads(free)
    config = DemoConfig.smoke_defaults(**overrides) if args.smoke else DemoConfig(**overrides)
    run_demo(config, echo=echo)


def cmd_finetune(args: argparse.Namespace) -> None:
    from minilora.finetune import run_finetune

    result = run_finetune(args, echo, find_model)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return
    eval_part = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    echo(f"trained {result.steps} steps{resumed}: final loss {result.final_loss:.4f}{eval_part}")
    echo(f"adapter (PEFT format, README model card): {result.adapter_dir}")
    echo(f"metrics: {result.metrics_path}" + (f"   loss curve: {result.plot_path}" if result.plot_path else ""))


# ---------------------------------------------------------------------------------------------- parsers
# One add_parser + add_argument block per command: alike in shape, each the documentation of its command.
def add_demo(sub: argparse._SubParsersAction) -> None:
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


def add_finetune(sub: argparse._SubParsersAction) -> None:
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
