"""Train a QLoRA adapter on the tiny model alone or as one rank of torchrun (used by test_distributed.py).

usage: _dist_script.py MODEL_DIR OUT STEPS --strategy single|ddp|fsdp [--resume] [--die-after K]
       [--checkpointing] [--bf16-params] [--report FILE] [--cuda]

--die-after K: every rank exits (code 3) at the start of step K + 1, after checkpoint K was written.
--report FILE: each rank appends {rank, local and full bytes of its flat 4-bit parameters} as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

torch.set_num_threads(1)

from _train_script import TINY_RUN  # noqa: E402  (this script's directory is on sys.path when it runs)

from minilora.loading import from_pretrained  # noqa: E402
from minilora.lora import add_lora  # noqa: E402
from minilora.testing.tiny import byte_tokenizer  # noqa: E402
from minilora.train import loop  # noqa: E402
from minilora.train.data import tokenize_records  # noqa: E402
from minilora.train.distributed import FlatLinear4bit, Single, init_from_env  # noqa: E402
from minilora_demo.price import split_products  # noqa: E402

ACCUM = TINY_RUN["grad_accum"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--bf16-params", action="store_true")
    ap.add_argument("--report")
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()

    fsdp_kw = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if args.bf16_params else {}
    strategy = Single() if args.strategy == "single" else init_from_env(args.strategy, **fsdp_kw)
    if args.die_after:
        real_loss, calls = loop.causal_lm_loss, [0]

        def dying_loss(model, batch):
            if torch.is_grad_enabled():  # a training micro-batch, not an evaluation
                if calls[0] == args.die_after * ACCUM:  # the first micro-batch of step die_after + 1
                    os._exit(3)
                calls[0] += 1
            return real_loss(model, batch)

        loop.causal_lm_loss = dying_loss

    tok = byte_tokenizer()
    train_p, eval_p, _ = split_products(22, 4, 0, seed=1)  # 22 rows: each epoch ends on a short batch
    train_data = tokenize_records([p.record() for p in train_p], tok, max_length=200)
    eval_data = tokenize_records([p.record() for p in eval_p], tok, max_length=200)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.cuda else "cpu"
    model = from_pretrained(args.model, quantize="nf4", device=device)
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    config = loop.TrainConfig(
        output_dir=args.out,
        max_steps=args.steps,
        **TINY_RUN,  # batch 4 x 2 micro-batches, as test_resume.py runs them
        gradient_checkpointing=args.checkpointing,
        fast=False,  # the eager loop (the CUDA-graph step does not run distributed)
    )
    loop.train(model, train_data.examples, config, eval_data.examples, 258, resume=args.resume, distributed=strategy)
    if args.report:
        flat = [m.quant_data for m in model.modules() if isinstance(m, FlatLinear4bit)]
        local = sum(p.to_local().numel() * p.element_size() for p in flat)
        full = sum(p.numel() * p.element_size() for p in flat)
        with open(args.report, "a") as f:
            f.write(json.dumps({"rank": strategy.rank, "local": local, "full": full, "n": len(flat)}) + "\n")


if __name__ == "__main__":
    main()
