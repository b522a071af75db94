# ruff: noqa: B023  (every closure below is timed at once, inside the iteration that made its tensors)
"""Issue 16, small batches: the 4-bit product at M = 2..64 rows against bitsandbytes 0.50, one process.

For gate_proj (14336x4096), down_proj (4096x14336) and q_proj (4096x4096), NF4 + double quant, bf16 x:
minilora's small-M tensor-core kernel (minilora/kernels/smallm.py; a few tiles, the default first), its
GEMV kernel (M <= 16), dequantize + cuBLAS F.linear, and bitsandbytes `matmul_4bit`. GPU time per call in
a CUDA graph cycling through > 150 MB of weight copies (every call reads HBM; bench_decode.py's "rot").
Rows {"case": "gemv M=<m> bitsandbytes <shape>", ...}: `matmul_4bit` as it dispatches by default against
bitsandbytes; errors against the float32 product with the reference weight.

    python3 -m benchmarks.gpu.bench_small_m --out DIR
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu.bench_decode import SHAPES, graph_time
from benchmarks.gpu.bench_kernels import rel_err
from benchmarks.harness import ROW_HEADER, environment, hardware_tag, md_table, ratio_row, write_results
from minilora.kernels import gemv as kgemv
from minilora.kernels import matmul as kmatmul
from minilora.kernels import quantize_4bit
from minilora.kernels import smallm as ksmall
from minilora.kernels.dequant import dequantize_4bit_triton
from minilora.quant import dequantize_4bit

MS = (2, 4, 8, 16, 32, 64)
TILES = [  # (BLOCK_N, BLOCK_KB, SPLIT_K, num_warps); None = default_config (64 x 64 x 4 x 4 on these shapes)
    None,
    (64, 64, 1, 4),
    (64, 64, 8, 4),
    (128, 64, 4, 8),
]  # the first sweep's other tiles (128x64x1x8, 32x64x2x4, 64x128x2x4, 16x128x4x4) lost: small-m-h100-sweep1.md


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    record: dict = {"env": environment(), "cases": [], "errors": []}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = quantize_4bit(w, 64, "nf4", True)
        bpacked, bqs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        w_ref = dequantize_4bit(packed, state, torch.float32)
        nbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
        copies = max(2, min(16, math.ceil(150e6 / nbytes)))
        packs = [packed] + [packed.clone() for _ in range(copies - 1)]
        bpacks = [bpacked] + [bpacked.clone() for _ in range(copies - 1)]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w_ref.T
            d: dict = {"weight": name, "M": m, "small_m": {}}
            d["bnb_us"] = graph_time([lambda p=p: bnb.matmul_4bit(x, p.t(), quant_state=bqs) for p in bpacks])
            d["err_bnb"] = rel_err(bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs), exact)
            d["deq_linear_us"] = graph_time(
                [lambda p=p: F.linear(x, dequantize_4bit_triton(p, state, torch.bfloat16)) for p in packs]
            )
            if m <= kgemv.GEMV_MAX_M:
                d["gemv_us"] = graph_time([lambda p=p: kgemv.gemv_4bit(x, p, state) for p in packs])
            for tile in TILES:
                cfg = None
                if tile is not None:
                    bn, kb, sk, nw = tile
                    cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_KB": kb, "SPLIT_K": sk, "num_warps": nw}
                key = "default" if tile is None else "x".join(map(str, tile))
                try:
                    err = rel_err(ksmall.matmul_4bit_small_m(x, packed, state, cfg), exact)
                    t = graph_time([lambda p=p: ksmall.matmul_4bit_small_m(x, p, state, cfg) for p in packs])
                except Exception as e:  # a tile that fails to compile is recorded, not fatal
                    record["errors"].append(f"{name} M={m} {key}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                d["small_m"][key] = {"us": t, "err": err}
            paths = {"deq+cuBLAS": d["deq_linear_us"]}
            if "gemv_us" in d:
                paths["gemv"] = d["gemv_us"]
            if "default" in d["small_m"]:
                paths["small-m"] = d["small_m"]["default"]["us"]
            d["dispatch_path"] = kmatmul.path_of(x, state)  # what matmul_4bit (the default) runs here
            d["dispatch_us"] = graph_time([lambda p=p: kmatmul.matmul_4bit(x, p, state) for p in packs])
            d["best_path"] = min(paths, key=paths.get)
            d["best_us"] = paths[d["best_path"]]
            record["cases"].append(d)
            sm = " ".join(f"{key} {v['us']:.1f}" for key, v in d["small_m"].items())
            print(f"{name} M={m}: bnb {d['bnb_us']:.1f} deq+lin {d['deq_linear_us']:.1f} gemv {d.get('gemv_us', 0):.1f}"
                  f" | small-m {sm}", flush=True)  # fmt: skip
        w = w_ref = packed = bpacked = packs = bpacks = None
        torch.cuda.empty_cache()
    record["rows"] = []
    for d in record["cases"]:
        unit = f"calls/s (1e6 / GPU us), ours = matmul_4bit's default ({d['dispatch_path']})"
        row = ratio_row(f"gemv M={d['M']} bitsandbytes {d['weight']}", 1e6 / d["dispatch_us"], 1e6 / d["bnb_us"], unit)
        if row is not None:
            record["rows"].append(row)
    write_results(args.out, f"small-m-{hardware_tag()}", record, render(record))
    print(render(record))


def render(r: dict) -> str:
    env = r["env"]
    keys = ["default"] + ["x".join(map(str, t)) for t in TILES if t is not None]
    head = (
        "# 4-bit product at M = 2..64: minilora vs bitsandbytes, one run\n\n"
        f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, "
        f"bitsandbytes {env['bitsandbytes']}. NF4 + double quant, blocksize 64, bf16 x. GPU us per call, CUDA graph "
        "over > 150 MB of weight copies. small-m tiles: BLOCK_N x BLOCK_KB x SPLIT_K x warps.\n\n"
    )
    table = md_table(
        [
            "weight",
            "M",
            "bnb",
            "deq+cuBLAS",
            "gemv",
            *[f"small-m {k}" for k in keys],
            "default",
            "bnb / default",
            "best",
        ],
        [
            [d["weight"], d["M"], d["bnb_us"], d["deq_linear_us"], d.get("gemv_us", "")]
            + [d["small_m"].get(k, {}).get("us", "") for k in keys]
            + [f"{d['dispatch_us']:.1f} ({d['dispatch_path']})", d["bnb_us"] / d["dispatch_us"], d["best_path"]]
            for d in r["cases"]
        ],
    )
    rows = md_table(ROW_HEADER, [[x["case"], x["minilora"], x["reference"], x["ratio"], x["unit"]] for x in r["rows"]])
    errs = "\n".join(
        f"- {d['weight']} M={d['M']}: small-m {d['small_m'].get('default', {}).get('err')}, bnb {d['err_bnb']:.1e}"
        for d in r["cases"]
    )
    tail = "\n\nRelative errors:\n" + errs + "\n\nerrors: " + ("; ".join(r["errors"]) or "none") + "\n"
    return head + table + "\n\n" + rows + tail


if __name__ == "__main__":
    main()
