"""GPU suite, training part (issues 6 and 7): the notes' QLoRA step, minilora vs transformers + bitsandbytes + peft.

Llama-3.1-8B shapes with random weights (32 layers, hidden 4096, 32/8 heads, MLP 14336, vocab 128256),
NF4 + double quant, bf16 compute, LoRA r=32 alpha=64 dropout 0.1 on q,k,v,o (fp32 adapters), gradient
checkpointing, AdamW lr 1e-4, SDPA attention; batches 4 x 182 and 1 x 2048 tokens. Both stacks are built
in this process from the same config; each is measured alone (the other freed). tokens/s over `--steps`
timed steps after `--warmup`; peak = torch.cuda.max_memory_allocated over the timed steps (weights
included). MFU counts 48 GFLOP per token (6 x 8e9, the anchors' convention) against the bf16 matmul rate
measured in the same run.

Also: 20 steps of a 2-layer model of the same widths on minilora's fast path and on its reference path
(`reference_mode`), same initial adapters, data and dropout seeds: the two loss curves must agree within
bf16 tolerance.

    python3 -m benchmarks.gpu.qlora_step --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import environment, hardware_tag, md_table, write_results

LLAMA8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORKLOADS = [(4, 182), (1, 2048)]
FLOP_PER_TOKEN = 48e9
# Rows of float32 logits alive at once in the chunked cross-entropy (256 x 128256 x 4 B = 131 MB); at 4 x 182
# tokens a chunk of 1024 held all 728 rows, as much as the reference's full logits.
CE_CHUNK_ROWS = 256


def to_bnb_4bit(model: nn.Module) -> nn.Module:
    """Every decoder Linear (not lm_head) as bitsandbytes' Linear4bit, NF4 + double quant, bf16 compute."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and cname != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
                ).to("cuda")
                setattr(parent, cname, q)
    return model


def build_reference(layers: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA8B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    to_bnb_4bit(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg_lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg_lora)


def build_minilora(layers: int, device: str = "cuda") -> nn.Module:
    from minilora.lora import add_lora
    from minilora.models import LlamaForCausalLM, ModelConfig
    from minilora.nn import Linear4bit, replace_linears

    cfg = ModelConfig(
        model_type="llama",
        head_dim=LLAMA8B["hidden_size"] // LLAMA8B["num_attention_heads"],
        **{**LLAMA8B, "num_hidden_layers": layers},
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:  # quantize layer by layer (the reference quantizer, on the GPU)
        replace_linears(layer, lambda name, lin: Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16))
    add_lora(model, r=32, alpha=64, target_modules=TARGETS, dropout=0.1, adapter_dtype=torch.float32)
    model.gradient_checkpointing = True
    return model


def minilora_loss(model: nn.Module, ids: torch.Tensor, chunked: bool) -> torch.Tensor:
    from minilora.kernels.loss import chunked_cross_entropy

    if chunked:
        hidden = model.model(ids)[:, :-1]  # (B, T-1, C)
        return chunked_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:], chunk_rows=CE_CHUNK_ROWS)
    logits = model(ids)[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def reference_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def measure(model: nn.Module, loss_fn, batch: int, seq: int, warmup: int, steps: int, graphed: bool = False) -> dict:
    """tokens/s over `steps` timed steps after `warmup`; peaks over warm-up (and capture) and timed steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, LLAMA8B["vocab_size"], (batch, seq), device="cuda", generator=gen) for _ in range(4)]
    losses = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if graphed:  # the whole step as one CUDA graph (minilora.train.cuda_graph); captured in the first call
        from minilora.train.cuda_graph import CUDAGraphStep

        opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)
        runner = CUDAGraphStep(model, opt, loss_fn, warmup_steps=3)

        def step(i: int) -> None:
            losses.append(runner(data[i % len(data)]).clone())

    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(i: int) -> None:
            loss = loss_fn(model, data[i % len(data)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    result = {
        "batch": batch,
        "seq": seq,
        "tokens_per_s": batch * seq * steps / dt,
        "step_s": dt / steps,
        "warmup_s": warm_s,
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_GB": torch.cuda.max_memory_reserved() / 1e9,
        "trainable_params": sum(p.numel() for p in params),
        "last_loss": float(losses[-1]),
    }
    opt = runner = None
    if graphed and hasattr(model, "model"):
        model.model.checkpoint_fn = None
    model.zero_grad(set_to_none=True)
    return result


def free(*objs: object) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def loss_match(steps: int, order: tuple[str, ...] = ("fast_graph", "fast", "reference", "reference_graphsafe")) -> dict:
    """20 steps on a 2-layer model (full widths), fast path vs reference path, same init and data.

    Eager: both paths with torch.utils.checkpoint and the same dropout seed. Graphed: the fast path as one
    CUDA graph per step (CUDAGraphStep) against the eager reference path with an alike-seeded
    GraphSafeCheckpoint (the same dropout masks), both with capturable AdamW.
    """
    from minilora.kernels import reference_mode
    from minilora.train.cuda_graph import CUDAGraphStep, GraphSafeCheckpoint

    torch.manual_seed(0)
    model = build_minilora(2)
    init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    gen = torch.Generator(device="cuda").manual_seed(1)
    data = [torch.randint(0, LLAMA8B["vocab_size"], (2, 128), device="cuda", generator=gen) for _ in range(steps)]

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return minilora_loss(m, ids, chunked=True)

    curves = {}
    for mode in order:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in init:
                    param.copy_(init[name])
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(123)  # the same dropout masks on both paths
        losses = []
        ctx = reference_mode() if mode.startswith("reference") else reference_mode(False)
        with ctx:
            if mode == "fast_graph":
                runner = CUDAGraphStep(model, torch.optim.AdamW(params, lr=1e-4, capturable=True), loss_fn, seed=9)
                losses = [float(runner(ids)) for ids in data]
                runner = None
            else:
                opt = torch.optim.AdamW(params, lr=1e-4, capturable=mode == "reference_graphsafe")
                if mode == "reference_graphsafe":
                    model.model.checkpoint_fn = GraphSafeCheckpoint("cuda", seed=9)
                for ids in data:
                    loss = loss_fn(model, ids)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(loss))
                # Drop the last loss: its autograd graph keeps the parameters' AccumulateGrad nodes alive,
                # and they remember the stream they were made on (the default one), which a later capture
                # may not wait on (NOTES.md: the graph-after-eager failure).
                loss = None
        model.model.checkpoint_fn = None
        model.zero_grad(set_to_none=True)
        curves[mode] = losses

    def compare(a: str, b: str) -> dict:
        diffs = [abs(x - y) for x, y in zip(curves[a], curves[b], strict=True)]
        rel = max(d / abs(y) for d, y in zip(diffs, curves[b], strict=True))
        return {"max_abs_diff": max(diffs), "max_rel_diff": rel}

    model = opt = None
    free()
    out: dict = {"steps": steps, **curves}
    if "fast" in curves and "reference" in curves:
        out.update(compare("fast", "reference"))
    if "fast_graph" in curves and "reference_graphsafe" in curves:
        out["graph"] = compare("fast_graph", "reference_graphsafe")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure minilora with torch.compile per block")
    parser.add_argument("--skip-eager", action="store_true", help="skip minilora eager and the loss match")
    parser.add_argument(
        "--graph", action="store_true", help="also the whole step as one CUDA graph (eager blocks, then compiled)"
    )
    parser.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)  # child process: JSON to this path
    parser.add_argument("--loss-match-only", type=Path, help=argparse.SUPPRESS)  # child process: JSON to this path
    args = parser.parse_args()
    if args.loss_match_only:
        args.loss_match_only.write_text(json.dumps(loss_match(20)))
        return
    if args.reference_only:
        t = time.perf_counter()
        model = build_reference(args.layers)
        build_s = time.perf_counter() - t
        runs = [measure(model, reference_loss, b, s, args.warmup, args.steps) for b, s in WORKLOADS]
        args.reference_only.write_text(json.dumps({"build_s": build_s, "runs": runs}))
        return
    env = environment()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    import triton.testing

    mm_tflops = 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ a, return_mode="median") * 1e-3) / 1e12
    a = None
    record: dict = {"env": env, "layers": args.layers, "bf16_matmul_TFLOPs": mm_tflops, "runs": []}

    def add(stack: str, res: dict) -> None:
        res["stack"] = stack
        res["mfu_pct"] = 100 * res["tokens_per_s"] * FLOP_PER_TOKEN * args.layers / 32 / (mm_tflops * 1e12)
        record["runs"].append(res)
        # written after every run: a later part failing keeps what was measured
        write_results(args.out, f"qlora-{hardware_tag()}", record, render(record))
        print(
            f"{stack} {res['batch']}x{res['seq']}: {res['tokens_per_s']:.0f} tok/s, peak {res['peak_GB']:.2f} GB, "
            f"MFU {res['mfu_pct']:.1f}%",
            flush=True,
        )

    # The reference runs in a child process: its libraries then share no CUDA state with minilora's runs
    # (after it ran in this process, the first CUDA-graph capture failed: benchmarks/gpu/NOTES.md).
    with tempfile.TemporaryDirectory() as tmp:
        child = [
            sys.executable,
            "-m",
            __spec__.name,
            "--reference-only",
            f"{tmp}/ref.json",
            "--layers",
            str(args.layers),
        ]
        child += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        done = subprocess.run(child, check=False)
        if done.returncode == 0:
            ref = json.loads(Path(f"{tmp}/ref.json").read_text())
            record["build_reference_s"] = ref["build_s"]
            for res in ref["runs"]:
                add("transformers+bnb+peft", res)
        else:  # the reference stack failing must not hide minilora's figures; it is recorded
            record["reference_error"] = f"child process exited with {done.returncode} (its output is above)"
            print("reference failed:", record["reference_error"], flush=True)

    t = time.perf_counter()
    model = build_minilora(args.layers)
    record["build_minilora_s"] = time.perf_counter() - t
    if not args.skip_eager:
        for b, s in WORKLOADS:
            add("minilora", measure(model, lambda m, ids: minilora_loss(m, ids, True), b, s, args.warmup, args.steps))
        # In a child process too: run here, after the eager runs, its first CUDA-graph capture failed
        # ("operation would make the legacy stream depend on a capturing blocking stream"), while the same
        # sequence in a fresh process captures (benchmarks/gpu/graph_probe.py; NOTES.md).
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", __spec__.name, "--loss-match-only", f"{tmp}/lm.json"], check=False
            )
            if done.returncode == 0:
                record["loss_match"] = json.loads(Path(f"{tmp}/lm.json").read_text())
                print(f"loss match: {record['loss_match']}", flush=True)
            else:
                record["loss_match_error"] = f"child process exited with {done.returncode} (its output is above)"
                print("loss match failed:", record["loss_match_error"], flush=True)
    if args.graph and args.compile:  # eager blocks in the graph first (compiling the blocks is not undone)
        graph_runs(model, "minilora+graph", args, add, record)
    if args.compile:
        # Per decoder block, static shapes. The 4-bit linear is a torch.library custom op (fake + autograd
        # registered), so a block traces whole; the blocks share one compiled code object (parameters and
        # buffers are graph inputs), with one variant per input requires_grad (block 0's input does not
        # require grad) and per workload shape. The limit is raised so that this never falls back to eager.
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        dynamo.config.recompile_limit = 64
        counters.clear()
        try:
            for layer in model.model.layers:
                layer.compile(dynamic=False)
            for b, s in WORKLOADS:
                t = time.perf_counter()
                res = measure(model, lambda m, ids: minilora_loss(m, ids, True), b, s, 3, args.steps)
                res["wall_incl_compile_s"] = time.perf_counter() - t
                add("minilora+compile", res)
            record["compile_stats"] = {
                "unique_graphs": counters["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(counters["graph_break"].values()),
                "graph_break_reasons": list(counters["graph_break"])[:10],
                "recompiles": counters["recompiles"] if "recompiles" in counters else {},
            }
            print("compile stats:", record["compile_stats"], flush=True)
            if args.graph:  # compiled blocks inside the whole-step graph
                graph_runs(model, "minilora+compile+graph", args, add, record)
        except Exception as err:  # report, do not hide: the compiled variant is optional
            record["compile_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            print("compile failed:", record["compile_error"][:500], flush=True)
    if args.graph and not args.compile:
        graph_runs(model, "minilora+graph", args, add, record)
    model = None
    free()
    write_results(args.out, f"qlora-{hardware_tag()}", record, render(record))
    print(render(record))


def graph_runs(model: nn.Module, stack: str, args: argparse.Namespace, add, record: dict) -> None:
    """Both workloads with the whole step captured as one CUDA graph; a failure is recorded, not raised."""
    try:
        for b, s in WORKLOADS:
            res = measure(model, lambda m, ids: minilora_loss(m, ids, True), b, s, args.warmup, args.steps, True)
            add(stack, res)
    except Exception as err:  # report, do not hide: the variant is optional
        record[f"{stack}_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        print(f"{stack} failed:", record[f"{stack}_error"][:800], flush=True)
        if hasattr(model, "model"):
            model.model.checkpoint_fn = None
        free()


def render(r: dict) -> str:
    env = r["env"]
    ref = {(x["batch"], x["seq"]): x for x in r["runs"] if x["stack"] == "transformers+bnb+peft"}
    rows = []
    for x in r["runs"]:
        base = ref.get((x["batch"], x["seq"]))
        rows.append(
            [
                x["stack"],
                f"{x['batch']} x {x['seq']}",
                x["tokens_per_s"],
                x["mfu_pct"],
                x["peak_GB"],
                x.get("peak_reserved_GB", ""),
                x["tokens_per_s"] / base["tokens_per_s"] if base else "",
                x["peak_GB"] / base["peak_GB"] if base else "",
            ]
        )
    lm = r.get("loss_match", {})
    lmg = lm.get("graph", {})
    graph_errors = "; ".join(f"{k}: {v[:300]}" for k, v in r.items() if k.endswith("graph_error"))
    compiled = "ok" if any(x["stack"].endswith("compile") for x in r["runs"]) else "not run"
    graphed = "ok" if any("graph" in x["stack"] for x in r["runs"]) else "not run"
    if "compile_stats" in r:
        compiled += f" ({r['compile_stats']})"
    return "\n".join(
        [
            "# QLoRA training step, Llama-3.1-8B shapes (random weights), one run\n",
            f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, "
            f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}. "
            f"{r['layers']} layers; bf16 matmul measured {r['bf16_matmul_TFLOPs']:.0f} TFLOP/s; "
            "MFU = tokens/s x 48 GFLOP / that.\n",
            md_table(
                [
                    "stack",
                    "batch x seq",
                    "tokens/s",
                    "MFU %",
                    "peak GB",
                    "reserved GB",
                    "tokens/s vs reference",
                    "peak vs reference",
                ],
                rows,
            ),
            "\nLoss match, 20 steps (2 layers, 2 x 128 tokens): "
            f"max |fast - reference| = {lm.get('max_abs_diff', float('nan')):.2e} "
            f"(relative {lm.get('max_rel_diff', float('nan')):.2e}). Whole step as a CUDA graph vs the eager "
            f"reference path with the same dropout masks: max |diff| = {lmg.get('max_abs_diff', float('nan')):.2e} "
            f"(relative {lmg.get('max_rel_diff', float('nan')):.2e}).\n",
            f"\n{('loss match failed: ' + r['loss_match_error'][:500]) if 'loss_match_error' in r else ''}\n",
            f"\ncompile: {r.get('compile_error', compiled)}\n",
            f"\nwhole-step CUDA graph: {graph_errors or graphed}\n",
        ]
    )


if __name__ == "__main__":
    main()
