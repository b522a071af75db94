# ruff: noqa: B023  (every closure below is timed at once, inside the iteration that made its tensors)
"""GPU suite, decode part (issue 7): the 4-bit GEMV kernel (minilora/kernels/gemv.py) at M = 1..16.

For gate_proj (14336x4096), down_proj (4096x14336) and q_proj (4096x4096), NF4 + double quant, bf16 x,
in one process: minilora's GEMV kernel (a sweep of tile configs at M = 1 and 16, then the default config
for M = 1, 2, 4, 8, 16) against bitsandbytes `matmul_4bit` (its gemv_4bit kernel at M = 1; dequantize +
matmul above), minilora's dequantize + F.linear, and bf16 F.linear on the dequantized weight.

Three timings per case:
  graph_rot   GPU time per call: calls captured in a CUDA graph, each on a different copy of the packed
              weight (enough copies for > 150 MB, 3x the 50 MB L2), so every call reads its weight from
              HBM. The honest figure for a model whose layers each read their own weight.
  graph_same  GPU time per call: 10 calls on the same weight in a CUDA graph (the earlier notes' method;
              a 30 MB weight then partly stays in L2 between calls).
  per_call    do_bench median with L2 flushed, launch included (host-bound for small work on this VM).
Correctness: relative error against the float32 product with the reference-dequantized weight.

    python3 -m benchmarks.gpu.bench_decode --out benchmarks/results
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu.bench_kernels import from_bnb_state, rel_err
from benchmarks.harness import bench_us, environment, hardware_tag, md_table, write_results
from minilora.kernels import gemv as kgemv
from minilora.kernels import matmul as kmatmul
from minilora.kernels import quantize_4bit
from minilora.kernels.dequant import dequantize_4bit_triton
from minilora.quant import dequantize_4bit

SHAPES = {"gate_proj": (14336, 4096), "down_proj": (4096, 14336), "q_proj": (4096, 4096)}
SWEEP = [  # (BLOCK_N, BLOCK_KB, num_warps)
    (4, 256, 4),
    (8, 256, 4),
    (16, 256, 4),
    (8, 512, 4),
    (16, 256, 8),
    (32, 256, 8),
    (8, 128, 2),
]


def graph_time(fns: list, reps: int = 1) -> float:
    """GPU time per call of the callables in `fns` (one after another, `reps` rounds) in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in fns:
                fn()
    t = bench_us(graph.replay, rep_ms=100)
    graph = None
    return t / (reps * len(fns))


def copy_bandwidth() -> float:
    """The card's copy bandwidth in TB/s (a 1 GiB device-to-device copy, read + write): the floors' yardstick."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e12


def nf4_copies(n: int, k: int) -> dict:
    """An (n, k) NF4+DQ weight quantized by minilora and by bitsandbytes, the float32 reference weight, its bytes,
    and enough copies of both packed weights (> 150 MB, 3x the L2) that a graph cycling through them reads HBM."""
    import bitsandbytes.functional as bnbF

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_4bit(w, 64, "nf4", True)
    bpacked, bqs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
    copies = max(2, min(16, math.ceil(150e6 / nbytes)))
    return {
        "packed": packed, "state": state, "bpacked": bpacked, "bqs": bqs, "nbytes": nbytes,
        "w_ref": dequantize_4bit(packed, state, torch.float32),
        "packs": [packed] + [packed.clone() for _ in range(copies - 1)],
        "bpacks": [bpacked] + [bpacked.clone() for _ in range(copies - 1)],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep (default configs only)")
    args = parser.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    env = environment()
    copy_tbs = copy_bandwidth()
    print(f"copy bandwidth {copy_tbs:.2f} TB/s", flush=True)
    record: dict = {"env": env, "copy_TBps": copy_tbs, "sweep": [], "decode": [], "errors": []}

    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = quantize_4bit(w, 64, "nf4", True)
        bpacked, bqs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        w_ref = dequantize_4bit(packed, state, torch.float32)
        w_bf16 = dequantize_4bit_triton(packed, state, torch.bfloat16)
        nbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
        copies = max(2, min(16, math.ceil(150e6 / nbytes)))
        packs = [packed] + [packed.clone() for _ in range(copies - 1)]
        bpacks = [bpacked] + [bpacked.clone() for _ in range(copies - 1)]
        floor_us = nbytes / (copy_tbs * 1e12) * 1e6
        # bitsandbytes on its own data equals ours on it (the same kernel family is compared)
        ours_on_bnb_state = from_bnb_state(bqs)

        # ---- tile sweep ----
        for m in () if args.no_sweep else (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w_ref.T
            for bn, kb, nw in SWEEP:
                cfg = {"BLOCK_M": 1 if m == 1 else 16, "BLOCK_N": bn, "BLOCK_KB": kb, "num_warps": nw}
                try:
                    err = rel_err(kgemv.gemv_4bit(x, packed, state, cfg), exact)
                    t_rot = graph_time([lambda p=p: kgemv.gemv_4bit(x, p, state, cfg) for p in packs])
                except Exception as e:  # a config that fails to compile is recorded, not fatal
                    record["errors"].append(f"{name} M={m} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                row = {"weight": name, "M": m, "BLOCK_N": bn, "BLOCK_KB": kb, "warps": nw}
                row.update(graph_rot_us=t_rot, err=err, pct_copy=100 * floor_us / t_rot)
                record["sweep"].append(row)
                print(f"sweep {name} M={m} {bn}x{kb} w{nw}: {t_rot:.1f} us ({row['pct_copy']:.0f}%) err {err:.1e}")

        # ---- M = 1..16: default config vs bitsandbytes vs dequant + F.linear vs bf16 ----
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w_ref.T
            d = {"weight": name, "M": m, "floor_us": floor_us, "config": str(kgemv.default_config(m, n, k))}
            d["err_gemv"] = rel_err(kgemv.gemv_4bit(x, packed, state), exact)
            d["err_bnb"] = rel_err(bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs), exact)
            d["err_gemv_on_bnb_data"] = rel_err(
                kgemv.gemv_4bit(x, bpacked, ours_on_bnb_state), bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs)
            )
            d["gemv_graph_rot_us"] = graph_time([lambda p=p: kgemv.gemv_4bit(x, p, state) for p in packs])
            d["bnb_graph_rot_us"] = graph_time([lambda p=p: bnb.matmul_4bit(x, p.t(), quant_state=bqs) for p in bpacks])
            d["deq_linear_graph_rot_us"] = graph_time(
                [lambda p=p: F.linear(x, dequantize_4bit_triton(p, state, torch.bfloat16)) for p in packs]
            )
            d["bf16_graph_us"] = graph_time([lambda: F.linear(x, w_bf16)], reps=4)
            d["gemv_graph_same_us"] = graph_time([lambda: kgemv.gemv_4bit(x, packed, state)], reps=10)
            d["bnb_graph_same_us"] = graph_time([lambda: bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs)], reps=10)
            d["gemv_call_us"] = bench_us(lambda: kgemv.gemv_4bit(x, packed, state))
            d["bnb_call_us"] = bench_us(lambda: bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs))
            d["dispatch_call_us"] = bench_us(lambda: kmatmul.matmul_4bit(x, packed, state))
            d["bnb_over_gemv_rot"] = d["bnb_graph_rot_us"] / d["gemv_graph_rot_us"]
            d["bnb_over_gemv_same"] = d["bnb_graph_same_us"] / d["gemv_graph_same_us"]
            d["gemv_pct_copy_rot"] = 100 * floor_us / d["gemv_graph_rot_us"]
            record["decode"].append(d)
            print(
                f"decode {name} M={m}: gemv {d['gemv_graph_rot_us']:.1f} us rot / {d['gemv_graph_same_us']:.1f} same "
                f"/ {d['gemv_call_us']:.1f} call; bnb {d['bnb_graph_rot_us']:.1f} / {d['bnb_graph_same_us']:.1f} / "
                f"{d['bnb_call_us']:.1f}; deq+lin {d['deq_linear_graph_rot_us']:.1f}; bf16 {d['bf16_graph_us']:.1f}; "
                f"err {d['err_gemv']:.1e} (bnb {d['err_bnb']:.1e})",
                flush=True,
            )
        w = w_ref = w_bf16 = packed = bpacked = packs = bpacks = None
        torch.cuda.empty_cache()

    md = render(record)
    write_results(args.out, f"decode-{hardware_tag()}", record, md)
    print(md)


def render(r: dict) -> str:
    env = r["env"]
    return "\n".join(
        [
            "# 4-bit decode (GEMV) on the H200: minilora vs bitsandbytes, one run\n",
            f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, "
            f"bitsandbytes {env['bitsandbytes']}. Copy bandwidth measured in this run: {r['copy_TBps']:.2f} TB/s. "
            "NF4 + double quant, blocksize 64, bf16 x. Times in us per call. 'rot': CUDA graph cycling through "
            "copies of the packed weight (> 150 MB, every call reads HBM); 'same': CUDA graph of 10 calls on one "
            "weight (partly L2-resident); 'call': do_bench median, launch included, L2 flushed. floor = packed "
            "+ absmax bytes at the copy bandwidth.\n",
            md_table(
                [
                    "weight",
                    "M",
                    "floor",
                    "minilora rot",
                    "% of floor",
                    "bnb rot",
                    "bnb/minilora rot",
                    "minilora same",
                    "bnb same",
                    "bnb/minilora same",
                    "deq+F.linear rot",
                    "bf16 F.linear",
                    "minilora call",
                    "bnb call",
                    "rel err (bnb)",
                ],
                [
                    [
                        d["weight"],
                        d["M"],
                        d["floor_us"],
                        d["gemv_graph_rot_us"],
                        d["gemv_pct_copy_rot"],
                        d["bnb_graph_rot_us"],
                        d["bnb_over_gemv_rot"],
                        d["gemv_graph_same_us"],
                        d["bnb_graph_same_us"],
                        d["bnb_over_gemv_same"],
                        d["deq_linear_graph_rot_us"],
                        d["bf16_graph_us"],
                        d["gemv_call_us"],
                        d["bnb_call_us"],
                        f"{d['err_gemv']:.1e} ({d['err_bnb']:.1e})",
                    ]
                    for d in r["decode"]
                ],
            ),
            "\n## Tile sweep (graph, rotated weights)\n",
            md_table(
                ["weight", "M", "BLOCK_N", "BLOCK_KB", "warps", "us", "% of floor", "rel err"],
                [
                    [x["weight"], x["M"], x["BLOCK_N"], x["BLOCK_KB"], x["warps"], x["graph_rot_us"], x["pct_copy"]]
                    + [f"{x['err']:.1e}"]
                    for x in r["sweep"]
                ],
            ),
            "\nerrors: " + ("; ".join(r["errors"]) or "none") + "\n",
        ]
    )


if __name__ == "__main__":
    main()
