# ruff: noqa: B023  (every closure below is timed at once, inside the iteration that made its tensors)
"""GPU suite, kernels part (issues 6 and 7): NF4+DQ dequantize and 4-bit linear on Llama-3.1-8B shapes.

Measures, in one process and one run: the copy bandwidth and bf16 matmul rate of the card (the ceilings),
minilora's Triton dequantize against bitsandbytes' CUDA kernel and the plain-PyTorch reference, and the
4-bit linear forward (and forward+backward) against bf16 F.linear and bitsandbytes' matmul_4bit.
Correctness is checked on the same tensors before timing: the Triton dequantize must equal the reference
bit for bit; matmuls must be within bf16 rounding of the float32 product of the same operands.

    python3 -m benchmarks.gpu.bench_kernels --out benchmarks/results [--quick]

Writes <out>/kernels-<card>.md and .json. Times are medians of CUDA-event timings with L2 flushed
before each call (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import bench_us, cpu_launch_us, environment, graph_us, hardware_tag, md_table, write_results
from minilora.kernels import dequant as kdequant
from minilora.kernels import matmul as kmatmul
from minilora.kernels import quantize_4bit, reference_mode
from minilora.quant import NestedState, QuantState, dequantize_4bit

SHAPES = {"gate_proj": (14336, 4096), "down_proj": (4096, 14336), "q_proj": (4096, 4096)}


def from_bnb_state(qs: object) -> QuantState:
    s2 = qs.state2  # type: ignore[attr-defined]
    return QuantState(
        absmax=qs.absmax,  # type: ignore[attr-defined]
        shape=qs.shape,  # type: ignore[attr-defined]
        code=qs.code,  # type: ignore[attr-defined]
        blocksize=qs.blocksize,  # type: ignore[attr-defined]
        quant_type=qs.quant_type,  # type: ignore[attr-defined]
        dtype=qs.dtype,  # type: ignore[attr-defined]
        offset=qs.offset,  # type: ignore[attr-defined]
        state2=None if s2 is None else NestedState(s2.absmax, s2.code, s2.blocksize),
    )


def ceilings() -> dict[str, float]:
    n = 1 << 30  # 1 GiB of bf16 per buffer
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench_us(lambda: dst.copy_(src))
    copy_tbs = 2 * n / (t * 1e-6) / 1e12
    src = dst = None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = bench_us(lambda: a @ b)
    return {"copy_TBps": copy_tbs, "copy_us_per_GiB": t, "bf16_matmul_TFLOPs": 2 * 8192**3 / (t_mm * 1e-6) / 1e12}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="fewer M values and repeats")
    args = parser.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    env = environment()
    ceil = ceilings()
    print(
        f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True
    )
    record: dict = {"env": env, "ceilings": ceil, "dequant": [], "linear": [], "linear_fwd_bwd": [], "checks": []}
    ms = [1, 4, 16, 728, 2048, 4096] if not args.quick else [1, 2048]

    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = quantize_4bit(w, 64, "nf4", True)  # minilora's quantizer, on the GPU
        bpacked, bqs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

        # ---- correctness: bit identity with the reference, and with bitsandbytes on its own data ----
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            with reference_mode():
                ref = dequantize_4bit(packed, state, dtype)
            got = kdequant.dequantize_4bit_triton(packed, state, dtype)
            record["checks"].append(
                {"what": f"dequant {name} nf4+dq -> {dtype}", "bit_identical": bool(torch.equal(bits(ref), bits(got)))}
            )
        ours_on_bnb = kdequant.dequantize_4bit_triton(bpacked, from_bnb_state(bqs), torch.bfloat16)
        bnb_out = bnbF.dequantize_4bit(bpacked, bqs)
        mismatch = int((bits(ours_on_bnb) != bits(bnb_out)).sum())
        record["checks"].append(
            {"what": f"dequant {name}: minilora kernel vs bnb on bnb's data", "mismatches": mismatch}
        )

        # ---- dequantize timing ----
        n_el = n * k
        nbytes = n_el // 2 + state.absmax.numel() + 4 * state.state2.absmax.numel() + 2 * n_el
        row = {"weight": name, "shape": [n, k], "bytes": nbytes}
        row["triton_us"] = bench_us(lambda: kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16))
        for tile in (2048, 8192):
            kdequant.TILE_BYTES = tile
            row[f"triton_tile{tile}_us"] = bench_us(
                lambda: kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16)
            )
        kdequant.TILE_BYTES = 4096
        row["bnb_us"] = bench_us(lambda: bnbF.dequantize_4bit(bpacked, bqs))
        row["triton_graph_us"] = graph_us(lambda: kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16))
        row["bnb_graph_us"] = graph_us(lambda: bnbF.dequantize_4bit(bpacked, bqs))
        row["triton_cpu_launch_us"] = cpu_launch_us(
            lambda: kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16)
        )
        row["bnb_cpu_launch_us"] = cpu_launch_us(lambda: bnbF.dequantize_4bit(bpacked, bqs))
        with reference_mode():
            row["reference_eager_us"] = bench_us(lambda: dequantize_4bit(packed, state, torch.bfloat16), rep_ms=100)
        for key in ("triton", "bnb", "triton_graph", "bnb_graph"):
            tbs = nbytes / (row[f"{key}_us"] * 1e-6) / 1e12
            row[f"{key}_TBps"] = tbs
            row[f"{key}_pct_copy"] = 100 * tbs / ceil["copy_TBps"]
        row["speedup_vs_bnb"] = row["bnb_us"] / row["triton_us"]
        record["dequant"].append(row)
        print(
            f"dequant {name}: triton {row['triton_us']:.1f} us ({row['triton_pct_copy']:.0f}% copy) "
            f"bnb {row['bnb_us']:.1f} us ({row['bnb_pct_copy']:.0f}%) ref {row['reference_eager_us']:.0f} us",
            flush=True,
        )

        # ---- linear forward ----
        w_bf16 = kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16)
        bnb_w = bpacked.t()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.float() @ w_bf16.float().T
            lin = {"weight": name, "M": m}
            lin["bf16_linear_us"] = bench_us(lambda: F.linear(x, w_bf16))
            lin["bnb_us"] = bench_us(lambda: bnb.matmul_4bit(x, bnb_w, quant_state=bqs))
            with reference_mode():
                lin["reference_us"] = bench_us(
                    lambda: F.linear(x, dequantize_4bit(packed, state, torch.bfloat16)), rep_ms=50
                )
            lin["ours_dequant_linear_us"] = bench_us(
                lambda: F.linear(x, kdequant.dequantize_4bit_triton(packed, state, torch.bfloat16))
            )
            lin["ours_matmul_us"] = bench_us(lambda: kmatmul.matmul_4bit(x, packed, state))  # GEMV for M <= 4
            if m <= 16:
                lin["graph_bf16_us"] = graph_us(lambda: F.linear(x, w_bf16))
                lin["graph_bnb_us"] = graph_us(lambda: bnb.matmul_4bit(x, bnb_w, quant_state=bqs))
                lin["graph_ours_us"] = graph_us(lambda: kmatmul.matmul_4bit(x, packed, state))
                lin["ours_cpu_launch_us"] = cpu_launch_us(lambda: kmatmul.matmul_4bit(x, packed, state))
            lin["err_matmul"] = rel_err(kmatmul.matmul_4bit(x, packed, state), exact)
            lin["err_bf16_linear"] = rel_err(F.linear(x, w_bf16), exact)
            lin["ours_best_us"] = min(lin["ours_dequant_linear_us"], lin["ours_matmul_us"])
            lin["ours_vs_bf16"] = lin["ours_best_us"] / lin["bf16_linear_us"]
            lin["bnb_over_ours"] = lin["bnb_us"] / lin["ours_best_us"]
            record["linear"].append(lin)
            print(
                f"linear {name} M={m}: bf16 {lin['bf16_linear_us']:.1f} bnb {lin['bnb_us']:.1f} "
                f"matmul_4bit {lin['ours_matmul_us']:.1f} deq+lin {lin['ours_dequant_linear_us']:.1f} us "
                f"err {lin['err_matmul']:.1e}",
                flush=True,
            )

        # ---- forward + backward (grad_input only: the base weight is frozen) ----
        for m in [m for m in ms if m >= 2048]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            fb = {"weight": name, "M": m}
            fb["bf16_us"] = bench_us(lambda: F.linear(x, w_bf16).backward(g))
            fb["bnb_us"] = bench_us(lambda: bnb.matmul_4bit(x, bnb_w, quant_state=bqs).backward(g))
            fb["ours_us"] = bench_us(lambda: kmatmul.linear_4bit(x, packed, state).backward(g))
            x.grad = None
            kmatmul.linear_4bit(x, packed, state).backward(g)
            fb["err_grad_input"] = rel_err(x.grad, g.float() @ w_bf16.float())
            fb["ours_vs_bf16"] = fb["ours_us"] / fb["bf16_us"]
            fb["bnb_over_ours"] = fb["bnb_us"] / fb["ours_us"]
            record["linear_fwd_bwd"].append(fb)
        w = w_bf16 = packed = bpacked = None
        torch.cuda.empty_cache()

    md = render(record)
    write_results(args.out, f"kernels-{hardware_tag()}", record, md)
    print(md)


def render(r: dict) -> str:
    env, c = r["env"], r["ceilings"]
    out = [
        "# GPU kernels: minilora (Triton) vs bitsandbytes vs bf16, one run\n",
        f"`{env['command']}` on {env['gpu']}, {env['date']}; torch {env['torch']} (CUDA {env['cuda']}), "
        f"triton {env['triton']}, bitsandbytes {env['bitsandbytes']}.\n",
        f"Ceilings measured in this run: device-to-device copy {c['copy_TBps']:.2f} TB/s (read + write), "
        f"bf16 matmul 8192^3 {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s.\n",
        "## NF4 + double-quant dequantize to bf16 (median us; bytes = packed + absmax + nested absmax + output)\n",
        md_table(
            [
                "weight",
                "minilora Triton",
                "% copy BW",
                "bitsandbytes",
                "% copy BW",
                "bnb / minilora",
                "reference eager",
            ],
            [
                [
                    d["weight"],
                    d["triton_us"],
                    d["triton_pct_copy"],
                    d["bnb_us"],
                    d["bnb_pct_copy"],
                    d["speedup_vs_bnb"],
                    d["reference_eager_us"],
                ]
                for d in r["dequant"]
            ],
        ),
        "\nSame, GPU time only (10 calls captured in a CUDA graph, per call) and host launch cost per call:\n",
        md_table(
            [
                "weight",
                "minilora graph us",
                "% copy BW",
                "bnb graph us",
                "% copy BW",
                "minilora host us",
                "bnb host us",
            ],
            [
                [
                    d["weight"],
                    d["triton_graph_us"],
                    d["triton_graph_pct_copy"],
                    d["bnb_graph_us"],
                    d["bnb_graph_pct_copy"],
                    d["triton_cpu_launch_us"],
                    d["bnb_cpu_launch_us"],
                ]
                for d in r["dequant"]
            ],
        ),
        "\n## 4-bit linear forward, bf16 x [M, K] @ NF4+DQ W.T (median us)\n",
        md_table(
            [
                "weight",
                "M",
                "bf16 F.linear",
                "bitsandbytes",
                "minilora matmul_4bit",
                "minilora dequant+F.linear",
                "reference eager",
                "best / bf16",
                "bnb / best",
                "rel err matmul_4bit",
            ],
            [
                [
                    x["weight"],
                    x["M"],
                    x["bf16_linear_us"],
                    x["bnb_us"],
                    x["ours_matmul_us"],
                    x["ours_dequant_linear_us"],
                    x["reference_us"],
                    x["ours_vs_bf16"],
                    x["bnb_over_ours"],
                    f"{x['err_matmul']:.1e}",
                ]
                for x in r["linear"]
            ],
        ),
        "\nDecode shapes, GPU time only (CUDA graph of 10 calls, per call):\n",
        md_table(
            ["weight", "M", "bf16 F.linear", "bitsandbytes", "minilora", "bnb / minilora", "minilora host us"],
            [
                [
                    x["weight"],
                    x["M"],
                    x["graph_bf16_us"],
                    x["graph_bnb_us"],
                    x["graph_ours_us"],
                    x["graph_bnb_us"] / x["graph_ours_us"],
                    x["ours_cpu_launch_us"],
                ]
                for x in r["linear"]
                if "graph_ours_us" in x
            ],
        ),
        "\n## forward + backward (grad_input), median us\n",
        md_table(
            ["weight", "M", "bf16", "bitsandbytes", "minilora", "minilora / bf16", "bnb / minilora", "grad rel err"],
            [
                [
                    x["weight"],
                    x["M"],
                    x["bf16_us"],
                    x["bnb_us"],
                    x["ours_us"],
                    x["ours_vs_bf16"],
                    x["bnb_over_ours"],
                    f"{x['err_grad_input']:.1e}",
                ]
                for x in r["linear_fwd_bwd"]
            ],
        ),
        "\n## checks\n",
        md_table(["check", "result"], [[x["what"], {k: v for k, v in x.items() if k != "what"}] for x in r["checks"]]),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
