"""Issue 15: `minilora.train.train` as it comes (no speed flags) against transformers + bitsandbytes + peft.

Llama-3.1-8B shapes with random weights, NF4 + double quant, bf16 compute, LoRA r=32 alpha=64 dropout 0.1 on
q,k,v,o, gradient checkpointing, AdamW lr 1e-4 (the notes' workload, as benchmarks/gpu/qlora_step.py builds
it). Cases, each measured in this call, every stack in a child process of its own (no shared CUDA state):

    4x182 / 1x2048    fixed-length batches; tokens/s (median of the timed steps) and peak memory
    liger             the same reference with Liger's kernels (apply_liger_kernel_to_llama)
    ragged            lengths drawn uniformly from 40..500 tokens, batch 4: the reference pads each batch
                      to its longest (transformers' collator); minilora's default path packs; only real
                      (non-pad) tokens count
    context           the longest single sequence one optimizer step trains without running out of memory
                      (doubling from 4096), for the reference and for minilora's default path
    warmup            minilora's first step (torch.compile of the blocks + CUDA-graph capture), in seconds

MFU counts 48 GFLOP per token (6 x 8e9: forward, recompute and input-gradient matmuls of a frozen base with
checkpointing; attention's T^2 term left out) against the bf16 matmul rate measured in this run.
Rows {"case", "minilora", "reference", "ratio", "unit"} go to train-default-<card>.json.

    python3 -m benchmarks.gpu.train_default --out DIR [--cases fixed,liger,ragged,context]
        [--context-limit N] [--child-timeout S]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu.qlora_step import FLOP_PER_TOKEN, LLAMA8B, build_minilora, build_reference
from benchmarks.harness import ROW_HEADER, environment, hardware_tag, md_table, ratio_row, write_results

SHAPES = [(4, 182), (1, 2048)]
STEPS, SKIP = 14, 4  # timed optimizer steps per case; the first SKIP are left out of the median


def ragged_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(40, 500) for _ in range(n)]


def token_batches(batch: int, lengths: list[int], seed: int = 0) -> list[list[list[int]]]:
    rng = random.Random(seed)
    seqs = [[rng.randrange(LLAMA8B["vocab_size"]) for _ in range(n)] for n in lengths]
    return [seqs[i : i + batch] for i in range(0, len(seqs), batch)]


# ---------------------------------------------------------------------------------------------- reference
def reference_steps(model, batches: list[list[list[int]]], steps: int) -> dict:
    """The reference's loop: each batch right-padded to its longest (labels -100 there), HF loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rates = []
    for i in range(steps):
        rows = batches[i % len(batches)]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        t = time.perf_counter()
        loss = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        rates.append(int(mask.sum()) / (time.perf_counter() - t))
    loss = None
    rates = rates[SKIP:] or rates  # a one-step run (the context search) keeps its one step
    return {"tokens_per_s": statistics.median(rates), "peak_GB": torch.cuda.max_memory_allocated() / 1e9}


def fits(step, seq: int) -> bool:
    try:
        step(seq)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


CONTEXT = {"start": 4096, "limit": 262144, "progress": None}  # set from the command line in each child


def max_context(step, start: int | None = None) -> int:
    """The longest power-of-two multiple of `start` for which one step runs (0 if none).

    Each length that fits is written to CONTEXT["progress"] at once, so a child stopped by its timeout still
    reports the longest length it trained."""
    best, seq = 0, start or CONTEXT["start"]
    while seq <= CONTEXT["limit"]:
        t = time.perf_counter()
        if not fits(step, seq):
            print(f"context {seq}: out of memory", flush=True)
            break
        print(f"context {seq}: trained in {time.perf_counter() - t:.1f} s", flush=True)
        best, seq = seq, seq * 2
        if CONTEXT["progress"] is not None:
            Path(CONTEXT["progress"]).write_text(json.dumps({"context": best, "partial": True}))
    return best


def run_reference(liger: bool, cases: list[str]) -> dict:
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model = build_reference(32)
    out: dict = {}
    if "fixed" in cases or liger:
        for b, s in SHAPES:
            out[f"{b}x{s}"] = reference_steps(model, token_batches(b, [s] * b * 4), STEPS)
    if "ragged" in cases and not liger:
        out["ragged"] = reference_steps(model, token_batches(4, ragged_lengths(4 * STEPS)), STEPS)
    if "context" in cases and not liger:

        def step(seq: int) -> None:
            reference_steps(model, token_batches(1, [seq]), 1)

        out["context"] = max_context(step)
    return out


# ---------------------------------------------------------------------------------------------- minilora
def minilora_run(model, lengths: list[int], batch: int, steps: int) -> dict:
    from minilora.train import loop
    from minilora.train.data import Example

    rng = random.Random(1)
    examples = []
    for n in lengths:
        ids = [rng.randrange(LLAMA8B["vocab_size"]) for _ in range(n)]
        examples.append(Example(ids, list(ids)))
    with tempfile.TemporaryDirectory() as tmp:
        config = loop.TrainConfig(
            output_dir=tmp,
            max_steps=steps,
            batch_size=batch,
            lr=1e-4,
            gradient_checkpointing=True,
            progress=False,
            plot=False,
            save_final_adapter=False,
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = loop.train(model, examples, config)
        metrics = [m for m in loop.read_metrics(Path(tmp) / "metrics.jsonl") if "tokens_per_s" in m]
    return {
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics[SKIP:]),
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
        "warmup_s": result.warmup_s,
        "path": result.path,
        "losses": result.losses,
    }


def run_minilora(cases: list[str]) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    t = time.perf_counter()
    model = build_minilora(32)
    out: dict = {"build_s": time.perf_counter() - t}
    if "fixed" in cases:
        for b, s in SHAPES:
            out[f"{b}x{s}"] = minilora_run(model, [s] * (b * (STEPS + 2)), b, STEPS)
    if "ragged" in cases:
        out["ragged"] = minilora_run(model, ragged_lengths(8 * STEPS), 4, STEPS)
    return out


def run_minilora_context() -> dict:
    """The eager loop with offloaded checkpoints on one long sequence per step (a fresh process)."""
    from minilora.train import loop
    from minilora.train.data import Example

    model = build_minilora(32)

    def step(seq: int) -> None:
        ids = torch.randint(0, LLAMA8B["vocab_size"], (seq,)).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            config = loop.TrainConfig(
                output_dir=tmp, max_steps=1, batch_size=1, gradient_checkpointing=True, fast=False,
                offload_checkpoints=True, progress=False, plot=False, save_final_adapter=False,
            )  # fmt: skip
            loop.train(model, [Example(ids, list(ids))], config)

    return {"context": max_context(step)}


# ---------------------------------------------------------------------------------------------- driver
def child(what: str, cases: list[str], path: Path) -> None:
    fn = {
        "reference": lambda: run_reference(False, cases),
        "liger": lambda: run_reference(True, cases),
        "minilora": lambda: run_minilora(cases),
        "minilora_context": run_minilora_context,
    }[what]
    CONTEXT["progress"] = path
    path.write_text(json.dumps(fn(), default=str))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cases", default="fixed,liger,ragged,context")
    parser.add_argument("--context-start", type=int, default=4096, help="first length the context search tries")
    parser.add_argument("--context-limit", type=int, default=262144, help="longest length the search tries")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds each stack may run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = args.cases.split(",")
    CONTEXT.update(start=args.context_start, limit=args.context_limit)
    if args.child:
        child(args.child, cases, args.child_out)
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    import triton.testing

    mm_tflops = 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ a, return_mode="median") * 1e-3) / 1e12
    a = None
    torch.cuda.empty_cache()
    record: dict = {"env": environment(), "bf16_matmul_TFLOPs": mm_tflops, "flop_per_token": FLOP_PER_TOKEN}
    stacks = ["reference"] + (["minilora"] if {"fixed", "ragged"} & set(cases) else [])
    stacks += (["liger"] if "liger" in cases else []) + (["minilora_context"] if "context" in cases else [])
    for what in stacks:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "benchmarks.gpu.train_default", "--child", what, "--cases", args.cases]
            start = args.context_start
            if what == "minilora_context":  # shorter lengths fit if the reference's longest does
                start = max(start, record.get("reference", {}).get("context") or start)
            cmd += ["--context-start", str(start), "--context-limit", str(args.context_limit)]
            t = time.perf_counter()
            try:
                done = subprocess.run([*cmd, "--child-out", f"{tmp}/r.json"], check=False, timeout=args.child_timeout)
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            out = Path(f"{tmp}/r.json")
            if out.exists():  # a complete result, or the context search's progress before a timeout
                record[what] = json.loads(out.read_text())
            if code != 0:
                record.setdefault(what, {})["error"] = f"exit {code}"
            print(f"{what}: {time.perf_counter() - t:.0f} s: {json.dumps(record[what])[:600]}", flush=True)
    record["rows"] = rows(record)
    write_results(args.out, f"train-default-{hardware_tag()}", record, render(record))
    print(render(record))


def rows(r: dict) -> list[dict]:
    ref, mini, liger = r.get("reference", {}), r.get("minilora", {}), r.get("liger", {})
    out = []

    def add(case: str, m, ref_v, unit: str) -> None:
        if (row := ratio_row(case, m, ref_v, unit)) is not None:
            out.append(row)

    for key in ("4x182", "1x2048", "ragged"):
        m, x = mini.get(key), ref.get(key)
        if not (isinstance(m, dict) and isinstance(x, dict)):
            continue
        add(key, m["tokens_per_s"], x["tokens_per_s"], "tokens/s (real tokens)")
        add(f"{key} memory", m["peak_GB"], x["peak_GB"], "peak GB (max_memory_allocated)")
        if isinstance(liger.get(key), dict):
            add(f"{key} liger", m["tokens_per_s"], liger[key]["tokens_per_s"], "tokens/s vs reference + Liger")
        mfu = 100 * m["tokens_per_s"] * r["flop_per_token"] / (r["bf16_matmul_TFLOPs"] * 1e12)
        ref_mfu = 100 * x["tokens_per_s"] * r["flop_per_token"] / (r["bf16_matmul_TFLOPs"] * 1e12)
        add(f"{key} mfu", mfu, ref_mfu, "% MFU (48 GFLOP/token over the measured bf16 matmul rate)")
        if m.get("warmup_s") is not None:
            out.append({"case": f"{key} warmup", "minilora": m["warmup_s"], "reference": None, "ratio": None,
                        "unit": "s, first step (compile + capture)"})  # fmt: skip
    ctx = r.get("minilora_context", {})
    unit = "tokens, longest single sequence trained (doubling from 4096)"
    if ctx.get("partial") or ref.get("partial"):
        unit += "; a search stopped by its timeout: at least this long"
    add("context", ctx.get("context"), ref.get("context"), unit)
    return out


def render(r: dict) -> str:
    env = r["env"]
    head = (
        f"# `minilora.train.train` default path vs transformers + bitsandbytes + peft, one call\n\n"
        f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}. "
        f"bf16 matmul measured {r['bf16_matmul_TFLOPs']:.0f} TFLOP/s. Llama-3.1-8B shapes, NF4+DQ, r=32 a=64 "
        "on q,k,v,o, gradient checkpointing. minilora path: "
        f"{r.get('minilora', {}).get('4x182', {}).get('path', '?')}.\n\n"
    )
    table = md_table(
        ROW_HEADER,
        [[x["case"], f"{x['minilora']:.4g}", x["reference"] if x["reference"] is None else f"{x['reference']:.4g}",
          "" if x["ratio"] is None else f"{x['ratio']:.3g}", x["unit"]] for x in r["rows"]],
    )  # fmt: skip
    return head + table + "\n"


if __name__ == "__main__":
    main()
