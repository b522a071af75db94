"""The commands that load a model and use its weights: ``generate`` from them, or write them out merged
(``merge``), quantized (``quantize``) or in another format (``export``). Each command is its ``cmd_`` function
and its parser block; minilora.cli puts them together.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from minilora.cli.common import echo, find_model
from minilora.errors import CLIError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


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

    config = SamplingConfig(  # bad settings fail here, before the model loads
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        fast=not args.no_fast,
    )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_dir = find_model(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = from_pretrained(model_dir, quantize=_quantize_arg(args.quantize), device=device)
    if args.adapter:
        load_adapter(model, args.adapter)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
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

    model_dir = find_model(args.model)
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
    echo(f"merged model written to {out}")


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

    model_dir = find_model(args.model)
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
            echo("note: MODEL is not a GGUF file; the export carries no tokenizer metadata")
        export_gguf(model, args.out, args.type, tokenizer=tokenizer, inputs=[i for i in inputs if i is not None])
    echo(f"{args.format} export written to {args.out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from minilora.io.safe_write import check_output, output_directory
    from minilora.loading import from_pretrained, save_quantized

    model_dir = find_model(args.model)
    out = Path(args.out)
    check_output(out, _inputs(args, model_dir))
    model = from_pretrained(
        model_dir, quantize=args.type, double_quant=not args.no_double_quant, blocksize=args.blocksize
    )
    with output_directory(out) as tmp:
        save_quantized(model, tmp)
        _copy_tokenizer(model_dir, tmp)
    echo(f"{args.type} checkpoint (bitsandbytes format) written to {out}")


# ---------------------------------------------------------------------------------------------- parsers
# One add_parser + add_argument block per command: alike in shape, each the documentation of its command.
def add_generate(sub: argparse._SubParsersAction) -> None:
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


def add_merge(sub: argparse._SubParsersAction) -> None:
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


def add_quantize(sub: argparse._SubParsersAction) -> None:
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


def add_export(sub: argparse._SubParsersAction) -> None:
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
