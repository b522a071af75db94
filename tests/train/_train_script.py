"""Train a LoRA on the tiny model (used by test_resume.py in a subprocess).

usage: _train_script.py MODEL_DIR OUT STEPS [--resume] [--slow] [--hang-at STEP --marker FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from minilora.loading import from_pretrained  # noqa: E402
from minilora.lora import add_lora  # noqa: E402
from minilora.testing.tiny import byte_tokenizer  # noqa: E402
from minilora.train import checkpoint as ckpt_io  # noqa: E402
from minilora.train import loop  # noqa: E402
from minilora.train.data import tokenize_records  # noqa: E402
from minilora_demo.price import split_products  # noqa: E402

# the run's settings, shared with _dist_script.py (the distributed runs of the same training)
TINY_RUN = dict(
    batch_size=4,
    grad_accum=2,
    lr=5e-3,
    warmup_steps=3,
    min_lr_ratio=0.1,
    eval_every=5,
    save_every=2,
    keep_last=2,
    seed=3,
    progress=False,
    plot=False,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--slow", action="store_true")
    ap.add_argument("--hang-at", type=int, default=0)
    ap.add_argument("--marker")
    args = ap.parse_args()

    if args.slow:  # give the parent time to kill us between and during steps
        real_loss = loop.causal_lm_loss

        def slow_loss(model, batch):
            time.sleep(0.1)
            return real_loss(model, batch)

        loop.causal_lm_loss = slow_loss
    if args.hang_at:
        real_save = ckpt_io.torch.save

        def hanging_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if Path(path).name == "optimizer.pt" and f"checkpoint-{args.hang_at:06d}" in str(path):
                Path(args.marker).write_text("now")
                time.sleep(600)

        ckpt_io.torch.save = hanging_save

    tok = byte_tokenizer()
    train_p, eval_p, _ = split_products(24, 4, 0, seed=1)
    train_data = tokenize_records([p.record() for p in train_p], tok, max_length=200)
    eval_data = tokenize_records([p.record() for p in eval_p], tok, max_length=200)
    model = from_pretrained(args.model, quantize="nf4")
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=0.1)
    config = loop.TrainConfig(output_dir=args.out, max_steps=args.steps, **TINY_RUN)
    loop.train(model, train_data.examples, config, eval_data.examples, pad_token_id=258, resume=args.resume)


if __name__ == "__main__":
    main()
