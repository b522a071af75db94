"""Train a QLoRA adapter on the tiny model alone or as one rank of torchrun (used by test_distributed.py).

usage: _dist_script.py MODEL_DIR OUT STEPS --strategy single|ddp|fsdp [--resume] [--die-after K]
       [--checkpointing] [--bf16-params] [--report FILE] [--cuda] [--sharded-load]

--die-after K: every rank exits (code 3) at the start of step K + 1, after checkpoint K was written.
--report FILE: each rank appends {rank, local and full bytes of its flat 4-bit parameters} as a JSON line,
    with the bytes of all its parameters + buffers just after loading (local, full) and, with --sharded-load,
    the peak held during the load (its tensors + the one full tensor just read) and the largest tensor read.
--sharded-load: FSDP.load instead of from_pretrained (each rank fills its own shards from the file).
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
from minilora.train.distributed import Single, init_from_env  # noqa: E402
from minilora.train.flat_4bit import FlatLinear4bit  # noqa: E402
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
    ap.add_argument("--sharded-load", action="store_true", help="FSDP.load: each rank reads only its shards")
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

    def prepare(model):
        loop.seed_everything(0)
        add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])

    peak = [0, 0, 0]  # most bytes held (parameters + buffers + the tensor just read), largest read, reads
    if args.sharded_load:

        def on_tensor(model, key, tensor):
            held = sum(_local_bytes(t) for t in {id(t): t for t in _tensors(model)}.values())
            peak[0] = max(peak[0], held + tensor.numel() * tensor.element_size())
            peak[1] = max(peak[1], tensor.numel() * tensor.element_size())
            peak[2] += 1

        model = strategy.load(args.model, "nf4", device=device, prepare=prepare, on_tensor=on_tensor)
    else:
        model = from_pretrained(args.model, quantize="nf4", device=device)
        prepare(model)
    loaded = {id(t): t for t in _tensors(model)}.values()
    local_bytes, full_bytes = sum(map(_local_bytes, loaded)), sum(t.numel() * t.element_size() for t in loaded)
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
            record = {"rank": strategy.rank, "local": local, "full": full, "n": len(flat), "peak": peak[0]}
            record |= {"largest_read": peak[1], "reads": peak[2]}
            record |= {"loaded_local": local_bytes, "loaded_full": full_bytes}
            f.write(json.dumps(record) + "\n")


def _tensors(model):
    return [*model.parameters(), *model.buffers()]


def _local_bytes(t):
    local = t.to_local() if hasattr(t, "to_local") else t
    return 0 if local.is_meta else local.numel() * local.element_size()


if __name__ == "__main__":
    main()
