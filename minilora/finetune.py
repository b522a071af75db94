"""The ``minilora finetune`` pipeline: data file -> summary -> (Q)LoRA training -> PEFT adapter + model card.

    1. read and check the data first (a bad record fails before any model loads): JSONL, JSON or CSV of
       prompt/completion, text or chat messages (minilora.train.datasets); hold out --eval-split
    2. refuse an --out that overlaps an input; lock it against a second writer (minilora.io.safe_write)
    3. load the model (quantized), tokenize, print the data summary, add LoRA
    4. train (minilora.train.loop: the run's identity, config + data SHA-256, guards --resume)
    5. the adapter records its base (``base_model_name_or_path``) and gets a README model card, so
       ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path), dir)``
       works from the adapter alone

Defaults are the settings the demo proved on SmolLM2-135M (minilora_demo.price.DemoConfig): NF4 + double quant,
LoRA r=32, alpha=64 on all seven decoder projections, no dropout, lr 1.5e-3 with 4 warmup steps and a
cosine to 10%, batch 8, gradient clipping at 1.0.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from minilora.train.datasets import Columns, build_examples, check_rows, data_sha256, read_rows, split_eval


def base_reference(ref: str, model_dir: Path) -> str:
    """What peft should load the base from: a hub id as given, else the (absolute) model directory."""
    if ref not in ("default", "") and not ref.endswith(".gguf") and not Path(ref).exists():
        return ref  # a hub id
    return str(Path(model_dir).resolve())


def _columns(args: argparse.Namespace) -> Columns:
    return Columns(args.prompt_field, args.completion_field, args.text_field, args.messages_field)


def run_finetune(args: argparse.Namespace, echo: Callable[[str], None], model_dir_of: Callable[[str], Path]) -> Any:
    """Run the finetune command for parsed ``args`` (see minilora.cli); returns the TrainResult."""
    import torch

    from minilora.io.safe_write import check_output, lock
    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained
    from minilora.lora import LoRAConfig, add_lora, trainable_parameters_report
    from minilora.lora.peft_io import write_model_card
    from minilora.train.data import pack_examples
    from minilora.train.distributed import FSDP
    from minilora.train.loop import TrainConfig, seed_everything, train

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.cuda_graph and not device.startswith("cuda"):
        raise ValueError(f"--cuda-graph needs a CUDA device (--device is {device})")
    distributed = None
    if "RANK" in os.environ:  # under torchrun: DDP or FSDP2 over its ranks (minilora.train.distributed)
        from minilora.train.distributed import init_from_env

        if args.cuda_graph:
            raise ValueError("--cuda-graph does not run under torchrun (the eager loop does)")
        bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.startswith("cuda"))
        mixed = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if bf16 else {}
        distributed = init_from_env(args.distributed, **(mixed if args.distributed == "fsdp" else {}))
        if device.startswith("cuda"):
            device = f"cuda:{torch.cuda.current_device()}"  # cuda:LOCAL_RANK
        if not distributed.is_main:  # one display, one log: rank 0's
            echo = lambda line: None  # noqa: E731
            logging.getLogger("minilora").setLevel(logging.WARNING)
    # 1. the data, before any model
    rows = read_rows(args.data)
    eval_rows = read_rows(args.eval_data) if args.eval_data else []
    for checked in (rows, eval_rows):
        if checked:
            check_rows(checked, _columns(args))
    if args.eval_split and not args.eval_data:
        rows, eval_rows = split_eval(rows, args.eval_split, args.seed)
    data_files = [args.data] + ([args.eval_data] if args.eval_data else [])
    local_model = args.model if os.path.exists(args.model) else None
    check_output(args.out, [*data_files, local_model])

    with lock(args.out) if distributed is None or distributed.is_main else nullcontext():
        # 2. model, tokenizer, examples
        model_dir = model_dir_of(args.model)
        tokenizer = Tokenizer.from_dir(model_dir)
        columns = _columns(args)
        kw = {"loss_on": args.loss_on, "max_length": args.max_length, "columns": columns, "skip_long": args.skip_long}
        examples, summary = build_examples(rows, tokenizer, source=str(args.data), **kw)
        for line in summary.lines():
            echo(line)
        eval_examples = None
        if eval_rows:
            source = str(args.eval_data) if args.eval_data else f"{args.data} (--eval-split {args.eval_split})"
            eval_examples, eval_summary = build_examples(eval_rows, tokenizer, source=source, **kw)
            for line in eval_summary.lines():
                echo(line)
        compute_dtype = torch.bfloat16 if args.bf16 == "yes" else None
        quantize = None if args.quantize == "none" else args.quantize

        # 3. LoRA
        base = base_reference(args.model, model_dir)
        targets = "all-linear" if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t]
        lora = LoRAConfig(
            r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets, base_model_name_or_path=base
        )

        def prepare(model: Any) -> None:
            seed_everything(args.seed)
            add_lora(model, config=lora)

        if isinstance(distributed, FSDP):  # FSDP2: each rank reads only its shards (FSDP.load)
            model = distributed.load(model_dir, quantize, compute_dtype=compute_dtype, device=device, prepare=prepare)
        else:
            model = from_pretrained(model_dir, quantize=quantize, compute_dtype=compute_dtype, device=device)
            prepare(model)
        echo(trainable_parameters_report(model))

        # 4. train
        config = TrainConfig(
            output_dir=args.out,
            max_steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio,
            max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=args.bf16,
            cache_base_weights=args.cache_base_weights,
            fast=not args.no_fast,
            cuda_graph=False if distributed else (True if args.cuda_graph else None),
            compile_blocks=False if distributed else None,
            eval_every=args.eval_every,
            save_every=args.save_every,
            keep_last=args.keep_last,
            print_every=args.log_every,
            seed=args.seed,
            progress=not args.no_progress,
        )
        run_info = {
            "model": {"base": base, "quantize": args.quantize},
            "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "targets": args.targets},
            "data": {
                "files": [str(Path(f).resolve()) for f in data_files],
                "sha256": data_sha256(data_files),
                "eval_split": args.eval_split if not args.eval_data else 0.0,
                "format": summary.format,
                "loss_on": args.loss_on,
                "columns": vars(columns),
                "max_length": args.max_length,
                "skip_long": args.skip_long,
                "pack": args.pack,
            },
        }
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        if args.pack:
            examples = pack_examples(examples, args.max_length)
        logging.getLogger("minilora.train.loop").setLevel(logging.INFO)  # the line naming the training path
        result = train(
            model,
            examples,
            config,
            eval_examples,
            pad,
            resume=args.resume,
            overwrite=args.overwrite,
            allow_changes=args.allow_changes,
            run_info=run_info,
            echo=echo,
            distributed=distributed,
        )
        for change in result.changes:
            echo(f"changed on resume (--allow-changes): {change}")

        # 5. the model card
        if result.adapter_dir is not None and (distributed is None or distributed.is_main):
            training = {"data": str(args.data), "records": summary.records, "examples": summary.examples}
            training.update({k: run_info["lora"][k] for k in ("r", "alpha", "dropout", "targets")})
            training.update({k: getattr(config, k) for k in ("batch_size", "grad_accum", "lr", "warmup_steps")})
            training.update(quantize=args.quantize, steps=result.steps, min_lr_ratio=config.min_lr_ratio)
            training.update(max_length=args.max_length, loss_on=args.loss_on, data_sha256=run_info["data"]["sha256"])
            metrics: dict[str, Any] = {"final train loss": result.final_loss, "tokens": result.tokens}
            if result.eval_loss is not None:
                metrics["final eval loss"] = result.eval_loss
            write_model_card(result.adapter_dir, base, training, metrics)
    return result
