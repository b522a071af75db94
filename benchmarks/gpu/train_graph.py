"""minilora's training loop on the H200, eager vs `cuda_graph=True`, at Llama-3.1-8B shapes (random weights).

`minilora.train.train` on synthetic prompt/completion examples of 150-200 tokens (prompt 100-130 tokens,
label -100), batch 4, NF4 + double quant, LoRA r=32 alpha=64 dropout 0.1 on q,k,v,o, gradient
checkpointing, bf16 autocast, AdamW, clipping at 1.0. Throughput is read from the loop's own
metrics.jsonl (tokens/s per step, real tokens only, padding not counted), median over the steps after the
first `--skip` (which hold the graph captures). Both runs in this process, eager first.

    python3 -m benchmarks.gpu.train_graph --out benchmarks/results
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu.qlora_step import LLAMA8B, build_minilora
from benchmarks.harness import environment, hardware_tag, md_table, write_results


def examples(n: int, seed: int = 0) -> list:
    from minilora.train.data import IGNORE_INDEX, Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(150, 200), rng.randint(100, 130)
        ids = [rng.randrange(LLAMA8B["vocab_size"]) for _ in range(length)]
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def run(graph: bool, layers: int, steps: int, skip: int) -> dict:
    from minilora.train import loop

    torch.manual_seed(0)
    model = build_minilora(layers)
    with tempfile.TemporaryDirectory() as tmp:
        config = loop.TrainConfig(
            output_dir=tmp,
            max_steps=steps,
            batch_size=4,
            lr=1e-4,
            gradient_checkpointing=True,
            fast=False,  # the graph alone against the eager loop
            cuda_graph=graph,
            progress=False,
            plot=False,
            save_final_adapter=False,
        )
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = loop.train(model, examples(4 * steps), config)
        wall = time.perf_counter() - t
        metrics = [m for m in loop.read_metrics(Path(tmp) / "metrics.jsonl") if "tokens_per_s" in m]
    rates = [m["tokens_per_s"] for m in metrics[skip:]]
    return {
        "cuda_graph": graph,
        "steps": steps,
        "tokens_per_s_median": statistics.median(rates),
        "wall_s": wall,
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
        "losses": result.losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip", type=int, default=8, help="steps left out of the median (captures happen there)")
    args = ap.parse_args()
    record = {"env": environment(), "layers": args.layers, "runs": []}
    for graph in (False, True):
        record["runs"].append(run(graph, args.layers, args.steps, args.skip))
        torch.cuda.empty_cache()
        print(record["runs"][-1], flush=True)
    eager, graphed = record["runs"]
    env = record["env"]
    rows = [
        [
            "graph" if r["cuda_graph"] else "eager",
            r["tokens_per_s_median"],
            r["tokens_per_s_median"] / eager["tokens_per_s_median"],
            r["wall_s"],
            r["peak_GB"],
            r["losses"][-1],
        ]
        for r in record["runs"]
    ]
    text = "\n".join(
        [
            "# minilora.train.train on the H200: eager vs cuda_graph=True (Llama-3.1-8B shapes, random weights)\n",
            f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}. "
            f"{args.layers} layers, batch 4 x 150-200 tokens (padded to 192/256 with the graph), {args.steps} steps, "
            f"median tokens/s over steps {args.skip + 1}-{args.steps} (real tokens).\n",
            md_table(["loop", "tokens/s", "vs eager", "wall s (incl. captures)", "peak GB", "last loss"], rows),
        ]
    )
    write_results(args.out, f"train-graph-{hardware_tag()}", record, text)
    print(text)


if __name__ == "__main__":
    main()
