"""Issue 16: batch-1 decode as `minilora.generate` does it by default on CUDA, against transformers.

Llama-3.1-8B shapes with random weights, a 32-token prompt, 256 new tokens, greedy. References: transformers
(+ bitsandbytes NF4+DQ) with its static cache and torch.compile (`cache_implementation="static"`, forward
compiled by transformers' generate itself), each in a child process of its own. minilora: `generate()` with the
default SamplingConfig (one CUDA graph per token, minilora.decode), NF4+DQ and bf16, and NF4+DQ with an
r=32 adapter on q,k,v,o left unmerged. Each stack generates once to warm up (compile, capture), then the
timed run; tokens/s = new tokens / wall time of the whole generate call (prefill included).

The bandwidth limit: bytes one token must read (packed codes + absmax + nested absmax of every 4-bit
weight, the bf16 norms and output head; bf16: every weight) over the copy bandwidth measured in this run.
Rows {"case", "minilora", "reference", "ratio", "unit"} go to decode-default-<card>.json.

    python3 -m benchmarks.gpu.decode_default --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.gpu.qlora_step import LLAMA8B, TARGETS, to_bnb_4bit
from benchmarks.harness import ROW_HEADER, environment, hardware_tag, md_table, ratio_row, write_results

PROMPT, NEW = 32, 256


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, LLAMA8B["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, less the embedding table (one row of it is read per token)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = any(
        getattr(m, "weight", None) is not None and id(m.weight) in emb
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in emb or tied)


def run_reference(quant: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA8B, attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if quant:  # every decoder Linear as bitsandbytes' Linear4bit, NF4 + double quant
        to_bnb_4bit(model)
        torch.cuda.empty_cache()
    model.eval()
    # transformers compiles the forward itself for a static cache (generation_config.compile_config)
    model.generation_config.cache_implementation = "static"
    ids = prompt_ids().cuda()

    def gen() -> list[int]:
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return out[0, PROMPT:].tolist()

    t = time.perf_counter()
    gen()
    warm = time.perf_counter() - t
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = gen()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"tokens_per_s": NEW / dt, "warmup_s": warm, "bytes_per_token": weight_bytes(model), "tokens": tokens}


def build_minilora(quant: bool) -> nn.Module:
    from minilora.models import LlamaForCausalLM, ModelConfig
    from minilora.nn import Linear4bit, replace_linears

    cfg = ModelConfig(model_type="llama", head_dim=128, **LLAMA8B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if quant:
        for layer in model.model.layers:
            replace_linears(layer, lambda name, lin: Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16))
    return model.eval()


def minilora_generate(model: nn.Module) -> dict:
    from minilora.generate import SamplingConfig, generate

    ids = prompt_ids()[0].tolist()
    config = SamplingConfig(max_new_tokens=NEW)
    t = time.perf_counter()
    generate(model, ids, config)
    warm = time.perf_counter() - t
    torch.cuda.synchronize()
    t = time.perf_counter()
    tokens = generate(model, ids, config)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    ref = generate(model, ids[:], SamplingConfig(max_new_tokens=64, fast=False))
    return {
        "tokens_per_s": NEW / dt,
        "warmup_s": warm,
        "bytes_per_token": weight_bytes(model),
        "tokens": tokens,
        "equal_64_to_reference_loop": tokens[:64] == ref,
        "reference_loop_tokens": ref,
        # where the graph path and the reference loop part (None: equal); random 8B weights give near-flat logits
        "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=False)) if a != b), None),
    }


@torch.no_grad()
def profile_token(model: nn.Module, steps: int = 8) -> list[dict]:
    """GPU time per token of each kernel name, over `steps` eager decode steps (the graph replays the same
    kernels without the launch gaps), largest first: where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from minilora.models.llama import StaticKVCache

    cache = StaticKVCache(model.config, 1, PROMPT + steps + 1, dtype=torch.bfloat16, device="cuda")
    nxt = model(prompt_ids().cuda(), cache=cache)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            nxt = model(nxt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():  # CUDA activity only: kernels, copies and sets
        us = getattr(e, "device_time_total", 0.0)
        if us > 0:
            per[e.key] = (us, e.count)
    rows_ = [
        {"kernel": k[:120], "us_per_token": us / steps, "calls_per_token": n / steps} for k, (us, n) in per.items()
    ]
    return sorted(rows_, key=lambda r: -r["us_per_token"])[:25]


def run_minilora(quant: bool, profile: bool = False) -> dict:
    from minilora.lora import add_lora

    model = build_minilora(quant)
    out = {"plain": minilora_generate(model)}
    if profile:
        out["plain"]["profile"] = profile_token(model)
    if quant:
        add_lora(model, r=32, alpha=64, target_modules=TARGETS, adapter_dtype=torch.bfloat16)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
        out["adapter"] = minilora_generate(model)
        if profile:
            out["adapter"]["profile"] = profile_token(model)
    return out


def copy_tbps() -> float:
    import triton.testing

    a = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", help="comma-separated children (default: all)")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds per child (NF4: ~140 s, H100)")
    parser.add_argument("--profile", action="store_true", help="also the per-kernel GPU time of one eager token")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    children = {
        "reference_nf4": lambda: run_reference(True),
        "reference_bf16": lambda: run_reference(False),
        "minilora_nf4": lambda: run_minilora(True, args.profile),
        "minilora_bf16": lambda: run_minilora(False, args.profile),
    }
    if args.child:
        args.child_out.write_text(json.dumps(children[args.child](), default=str))
        return
    record: dict = {"env": environment(), "copy_TBps": copy_tbps(), "prompt": PROMPT, "new_tokens": NEW}
    stem = f"decode-default-{hardware_tag()}"
    for what in args.only.split(",") if args.only else children:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "benchmarks.gpu.decode_default", "--child", what, "--child-out", f"{tmp}/r"]
            cmd += ["--profile"] if args.profile else []
            try:
                done = subprocess.run(cmd, check=False, timeout=args.child_timeout)
            except subprocess.TimeoutExpired:
                done = subprocess.CompletedProcess(cmd, "timeout")
            record[what] = (
                json.loads(Path(f"{tmp}/r").read_text()) if done.returncode == 0 else {"error": done.returncode}
            )
            print(f"{what}: {time.perf_counter() - t:.0f} s: {json.dumps(record[what])[:300]}", flush=True)
        record["rows"] = rows(record)  # after every child: a later one running out of time loses nothing
        write_results(args.out, stem, record, render(record))
    print(render(record))


def rows(r: dict) -> list[dict]:
    out = []
    bw = r["copy_TBps"] * 1e12

    def add(case, m, ref, unit):
        if (row := ratio_row(case, m, ref, unit)) is not None:
            out.append(row)

    for fmt in ("nf4", "bf16"):
        m, x = r.get(f"minilora_{fmt}", {}).get("plain", {}), r.get(f"reference_{fmt}", {})
        add(f"{fmt} batch 1", m.get("tokens_per_s"), x.get("tokens_per_s"), "tokens/s vs transformers static+compile")
        if m.get("bytes_per_token"):
            limit = bw / m["bytes_per_token"]
            add(f"{fmt} batch 1 bandwidth share", m["tokens_per_s"], limit, "tokens/s vs the bandwidth limit")
        if x.get("bytes_per_token") and x.get("tokens_per_s"):
            add(
                f"{fmt} batch 1 reference bandwidth share",
                x["tokens_per_s"],
                bw / x["bytes_per_token"],
                "reference tokens/s vs the bandwidth limit",
            )
    nf4 = r.get("minilora_nf4", {})
    add(
        "nf4 batch 1 adapter",
        nf4.get("adapter", {}).get("tokens_per_s"),
        nf4.get("plain", {}).get("tokens_per_s"),
        "tokens/s with an unmerged r=32 q,k,v,o adapter vs without",
    )
    return out


def render(r: dict) -> str:
    env = r["env"]
    head = (
        f"# Batch-1 decode, Llama-3.1-8B shapes: `minilora.generate` default vs transformers static cache + "
        f"compile, one call\n\n`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}. Copy bandwidth "
        f"{r['copy_TBps']:.2f} TB/s. {r['prompt']}-token prompt, {r['new_tokens']} new tokens, greedy.\n\n"
    )
    table = md_table(
        ROW_HEADER,
        [[x["case"], x["minilora"], x["reference"], x["ratio"], x["unit"]] for x in r["rows"]],
    )
    eq = {k: v.get("plain", {}).get("equal_64_to_reference_loop") for k, v in r.items() if k.startswith("minilora")}
    at = {k: v.get("plain", {}).get("first_difference") for k, v in r.items() if k.startswith("minilora")}
    prof = ""
    for k, v in r.items():
        for kind in ("plain", "adapter") if k.startswith("minilora") else ():
            if v.get(kind, {}).get("profile"):
                rows_ = [
                    [p["kernel"], f"{p['us_per_token']:.1f}", f"{p['calls_per_token']:.0f}"] for p in v[kind]["profile"]
                ]
                prof += f"\n### {k} {kind}: GPU time per token by kernel (eager steps)\n\n"
                prof += md_table(["kernel", "us / token", "calls / token"], rows_)
    return (
        head
        + table
        + (f"\nGraph path's greedy tokens equal the reference loop's (64 tokens): {eq}; first difference at: {at}\n")
        + prof
    )


if __name__ == "__main__":
    main()
