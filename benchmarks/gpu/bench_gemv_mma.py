# ruff: noqa: B023  (every closure below is timed at once, inside the iteration that made its tensors)
"""GPU suite, decode part (issue 16): the tensor-core register-decode GEMV (minilora/kernels/gemv_mma.py) against
gemv.py's kernel, bitsandbytes 0.50 and the read floor, M = 1, 2, 4, 8, in one process.

Llama-3.1-8B shapes, NF4 + double quant, blocksize 64, bf16 x. GPU time per call from a CUDA graph cycling
through copies of the weight (> 150 MB, every call reads HBM: bench_decode's "rot"). The floor is the packed
bytes + absmax codes + nested absmax at the copy bandwidth measured in the same run. Rows:
"gemv <shape> floor" (floor us / our us) and "gemv M=<m> bitsandbytes <shape>" (bnb us / our us).

    python3 -m benchmarks.gpu.bench_gemv_mma --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.gpu.bench_decode import copy_bandwidth, graph_time, nf4_copies
from benchmarks.gpu.bench_kernels import rel_err
from benchmarks.harness import environment, hardware_tag, md_table, write_results
from minilora.kernels import gemv as kgemv
from minilora.kernels import gemv_mma
from minilora.kernels.matmul import matmul_4bit

SHAPES = {
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
    "4096x4096": (4096, 4096),
    "1024x4096": (1024, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import bitsandbytes as bnb

    torch.manual_seed(0)
    env = environment()
    copy_tbs = copy_bandwidth()
    print(f"copy bandwidth {copy_tbs:.2f} TB/s", flush=True)
    table, rows, errors = [], [], []
    for name, (n, k) in SHAPES.items():
        c = nf4_copies(n, k)
        packed, state, bpacked, bqs, w_ref = c["packed"], c["state"], c["bpacked"], c["bqs"], c["w_ref"]
        packs, bpacks = c["packs"], c["bpacks"]
        floor_us = c["nbytes"] / (copy_tbs * 1e12) * 1e6
        preps = [gemv_mma.prepared(p, state) for p in packs]
        for m in (1, 2, 4, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w_ref.T
            d = {"weight": name, "M": m, "floor_us": floor_us}
            d["err_mma"] = rel_err(gemv_mma.gemv_4bit_mma(x, packed, state), exact)
            d["err_bnb"] = rel_err(bnb.matmul_4bit(x, bpacked.t(), quant_state=bqs), exact)

            def timed(wv: int | None) -> float:
                fns = [lambda p=p, pr=pr: gemv_mma.gemv_4bit_mma(x, p, state, prep=pr, warps=wv) for p, pr in
                       zip(packs, preps, strict=True)]  # fmt: skip
                return graph_time(fns)

            d["mma_us"] = timed(None)
            for wv in (2, 4, 8, 16):
                if (k // 64) % wv == 0 and wv != gemv_mma.warps_for(n, k):
                    d[f"mma_w{wv}_us"] = timed(wv)
            d["fma_us"] = graph_time([lambda p=p: kgemv.gemv_4bit(x, p, state) for p in packs]) if m <= 16 else None
            d["bnb_us"] = graph_time([lambda p=p: bnb.matmul_4bit(x, p.t(), quant_state=bqs) for p in bpacks])
            d["default_us"] = graph_time([lambda p=p: matmul_4bit(x, p, state) for p in packs])
            d["pct_floor"] = 100 * floor_us / d["mma_us"]
            table.append(d)
            print(d, flush=True)
            if m == 1:
                rows.append(
                    {
                        "case": f"gemv {name} floor",
                        "minilora": d["mma_us"],
                        "reference": floor_us,
                        "ratio": floor_us / d["mma_us"],
                        "unit": "us per call (ratio = floor / minilora)",
                    }
                )
            rows.append(
                {
                    "case": f"gemv M={m} bitsandbytes {name}",
                    "minilora": d["mma_us"],
                    "reference": d["bnb_us"],
                    "ratio": d["bnb_us"] / d["mma_us"],
                    "unit": "us per call (ratio = bitsandbytes / minilora)",
                }
            )
        c = w_ref = packed = bpacked = packs = bpacks = preps = None
        gemv_mma._layouts.clear()
        torch.cuda.empty_cache()
    record = {"env": env, "copy_TBps": copy_tbs, "table": table, "rows": rows, "errors": errors}
    cols = ["weight", "M", "floor_us", "mma_us", "pct_floor", "fma_us", "bnb_us", "default_us", "err_mma", "err_bnb"]
    extra = sorted({c for d in table for c in d if c.startswith("mma_w")})
    md = "\n".join([
        "# 4-bit GEMV: tensor-core register decode (gemv_mma) vs gemv.py, bitsandbytes and the read floor\n",
        f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env['triton']}, "
        f"bitsandbytes {env['bitsandbytes']}. Copy bandwidth {copy_tbs:.2f} TB/s. NF4 + double quant, blocksize 64, "
        "bf16 x; GPU us per call, CUDA graph over > 150 MB of weight copies. default = matmul_4bit's dispatch.\n",
        md_table(cols + extra, [[d.get(c) for c in cols + extra] for d in table]),
        "",
        md_table(["case", "minilora", "reference", "ratio", "unit"],
                 [[r["case"], r["minilora"], r["reference"], r["ratio"], r["unit"]] for r in rows]),
    ])  # fmt: skip
    write_results(args.out, f"gemv-mma-{hardware_tag()}", record, md)
    print(md)


if __name__ == "__main__":
    main()
