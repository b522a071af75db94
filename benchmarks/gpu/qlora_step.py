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

    python benchmarks/gpu/qlora_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, md_table, write_results  # noqa: E402

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


def build_reference(layers: int) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA8B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg_lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg_lora)


def build_minilora(layers: int, device: str = "cuda") -> nn.Module:
    from minilora.lora import add_lora
    from minilora.models import LlamaForCausalLM, ModelConfig
    from minilora.quant import Linear4bit, replace_linears

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
        return chunked_cross_entropy(hidden, model.lm_head.weight, ids[:, 1:], chunk_rows=1024)
    logits = model(ids)[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def reference_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def measure(model: nn.Module, loss_fn, batch: int, seq: int, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randint(0, LLAMA8B["vocab_size"], (batch, seq), device="cuda", generator=gen) for _ in range(4)]
    losses = []

    def step(i: int) -> None:
        loss = loss_fn(model, data[i % len(data)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    opt = None
    return {
        "batch": batch,
        "seq": seq,
        "tokens_per_s": batch * seq * steps / dt,
        "step_s": dt / steps,
        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
        "trainable_params": sum(p.numel() for p in params),
        "last_loss": float(losses[-1]),
    }


def free(*objs: object) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def loss_match(steps: int) -> dict:
    """20 steps on a 2-layer model (full widths), fast path vs reference path, same init and data."""
    from minilora.kernels import reference_mode

    torch.manual_seed(0)
    model = build_minilora(2)
    init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    gen = torch.Generator(device="cuda").manual_seed(1)
    data = [torch.randint(0, LLAMA8B["vocab_size"], (2, 128), device="cuda", generator=gen) for _ in range(steps)]
    curves = {}
    for mode in ("fast", "reference"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in init:
                    param.copy_(init[name])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.manual_seed(123)  # the same dropout masks on both paths
        losses = []
        ctx = reference_mode() if mode == "reference" else reference_mode(False)
        with ctx:
            for ids in data:
                loss = minilora_loss(model, ids, chunked=True)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
        curves[mode] = losses
    diffs = [abs(a - b) for a, b in zip(curves["fast"], curves["reference"], strict=True)]
    model = opt = None
    free()
    return {
        "steps": steps,
        "fast": curves["fast"],
        "reference": curves["reference"],
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(d / abs(b) for d, b in zip(diffs, curves["reference"], strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure minilora with torch.compile per block")
    parser.add_argument(
        "--cudagraphs", action="store_true", help="also torch.compile per block with mode='reduce-overhead'"
    )
    parser.add_argument("--skip-eager", action="store_true", help="skip minilora eager and the loss match")
    args = parser.parse_args()
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
        write_results(args.out, "qlora-h200", record, render(record))  # keep what was measured if a later part fails
        print(
            f"{stack} {res['batch']}x{res['seq']}: {res['tokens_per_s']:.0f} tok/s, peak {res['peak_GB']:.2f} GB, "
            f"MFU {res['mfu_pct']:.1f}%",
            flush=True,
        )

    try:
        t = time.perf_counter()
        model = build_reference(args.layers)
        record["build_reference_s"] = time.perf_counter() - t
        for b, s in WORKLOADS:
            add("transformers+bnb+peft", measure(model, reference_loss, b, s, args.warmup, args.steps))
        model = None
        free()
    except Exception as err:  # the reference stack failing must not hide minilora's figures; it is recorded
        record["reference_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        print("reference failed:", record["reference_error"][:800], flush=True)
        model = None
        free()

    t = time.perf_counter()
    model = build_minilora(args.layers)
    record["build_minilora_s"] = time.perf_counter() - t
    if not args.skip_eager:
        for b, s in WORKLOADS:
            add("minilora", measure(model, lambda m, ids: minilora_loss(m, ids, True), b, s, args.warmup, args.steps))
        record["loss_match"] = loss_match(20)
        print(f"loss match: max abs diff {record['loss_match']['max_abs_diff']:.2e}", flush=True)
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
        except Exception as err:  # report, do not hide: the compiled variant is optional
            record["compile_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            print("compile failed:", record["compile_error"][:500], flush=True)
    if args.cudagraphs:
        # Same, with CUDA graphs (cudagraph trees): removes the host launch cost that bounds the step.
        try:
            for layer in model.model.layers:
                layer.compile(dynamic=False, mode="reduce-overhead")
            for b, s in WORKLOADS:
                t = time.perf_counter()
                res = measure(model, lambda m, ids: minilora_loss(m, ids, True), b, s, 3, args.steps)
                res["wall_incl_compile_s"] = time.perf_counter() - t
                add("minilora+compile+cudagraphs", res)
        except Exception as err:  # report, do not hide: the variant is optional
            record["cudagraphs_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            print("cudagraphs failed:", record["cudagraphs_error"][:800], flush=True)
    model = None
    free()
    write_results(args.out, "qlora-h200", record, render(record))
    print(render(record))


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
                x["tokens_per_s"] / base["tokens_per_s"] if base else "",
                x["peak_GB"] / base["peak_GB"] if base else "",
            ]
        )
    lm = r.get("loss_match", {})
    compiled = "ok" if any(x["stack"].endswith("compile") for x in r["runs"]) else "not run"
    graphed = "ok" if any("cudagraphs" in x["stack"] for x in r["runs"]) else "not run"
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
                ["stack", "batch x seq", "tokens/s", "MFU %", "peak GB", "tokens/s vs reference", "peak vs reference"],
                rows,
            ),
            "\nLoss match, 20 steps (2 layers, 2 x 128 tokens): "
            f"max |fast - reference| = {lm.get('max_abs_diff', float('nan')):.2e} "
            f"(relative {lm.get('max_rel_diff', float('nan')):.2e}).\n",
            f"\ncompile: {r.get('compile_error', compiled)}\n",
            f"\ncudagraphs: {r.get('cudagraphs_error', graphed)}\n",
        ]
    )


if __name__ == "__main__":
    main()
