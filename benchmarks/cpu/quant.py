"""Suite `quant`: NF4 + double-quant quantize and dequantize on CPU, minilora against bitsandbytes.

Weights of Llama-3.1-8B's shapes (q_proj 4096x4096 and gate_proj 14336x4096) in bfloat16, blocksize 64.
Both libraries run in this process, interleaved call by call, on the same rotating inputs (a few distinct
weights cycled, so no call finds the previous call's data in cache). Reported: median wall time of
repeats after a warm-up, the minilora / bitsandbytes ratio, and the peak resident memory each call adds
(VmHWM after resetting it), with the bytes of the input weight for scale. The outputs are checked to be
identical bit for bit in the same run.

minilora's CPU dequantize of a large weight runs a kernel built by torch.compile (minilora/kernels/compiled.py),
compiled at its first call in the process: that first call is timed on its own ("first call ms"), before the
warm-up; one compile serves every shape, so only the first weight pays it.

With `--device cuda` the weights live on the GPU: bitsandbytes runs its CUDA kernels, minilora its Triton
kernels (kernels/quantize.py for the 4-bit codes and the 8-bit double-quant codes, kernels/dequant.py).
Every timed call is synchronized and the peak memory is torch.cuda.max_memory_allocated above the
allocation before the call. minilora follows bitsandbytes' CUDA rounding there, so the stored bytes must be
identical; any differing codes are counted and reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.cpu.dequant_floor import add_section, decompose
from benchmarks.harness import Report, bench_pair, peak_memory, progress, verdict

FULL_SHAPES = [("q_proj", 4096, 4096), ("gate_proj", 14336, 4096)]
SMOKE_SHAPES = [("tiny_a", 256, 256), ("tiny_b", 512, 256)]


def _libs() -> dict[str, dict[str, Any]]:
    import bitsandbytes.functional as bnbF

    from minilora.kernels import dequantize_4bit, quantize_4bit  # the door: the fast path that applies

    return {
        "minilora": {
            "quantize": lambda w: quantize_4bit(w, 64, "nf4", compress_statistics=True),
            "dequantize": lambda packed, state: dequantize_4bit(packed, state),
        },
        "bitsandbytes": {
            "quantize": lambda w: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
            "dequantize": lambda packed, state: bnbF.dequantize_4bit(packed, state),
        },
    }


def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    report = Report("quant", argv, out, smoke, device)
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    q_repeats, d_repeats, n_inputs = (2, 3, 2) if smoke else (9, 20, 3)
    libs = _libs()
    rows, records, decomposed = [], [], []
    torch.manual_seed(0)
    for name, rows_, cols in progress(shapes, "quant shapes"):
        weights = [(torch.randn(rows_, cols) * 0.02).to(torch.bfloat16).to(device) for _ in range(n_inputs)]
        rec: dict[str, Any] = {"weight": name, "shape": [rows_, cols], "input_bytes": weights[0].nbytes}
        quantized = {lib: [fns["quantize"](w) for w in weights] for lib, fns in libs.items()}  # + warm-up
        for op in ("quantize", "dequantize"):
            if op == "quantize":
                calls = {
                    lib: (lambda i, f=fns["quantize"], ws=weights: f(ws[i % n_inputs])) for lib, fns in libs.items()
                }
                timed = bench_pair(calls, q_repeats, warmup=0, device=device)
            else:
                calls = {
                    lib: (lambda i, f=fns["dequantize"], qs=quantized[lib]: f(*qs[i % n_inputs]))
                    for lib, fns in libs.items()
                }
                for lib, fn in calls.items():  # minilora compiles its CPU kernel here (first weight only)
                    t0 = time.perf_counter()
                    fn(0)
                    rec[f"{lib}_dequantize_first_call_s"] = time.perf_counter() - t0
                timed = bench_pair(calls, d_repeats, warmup=2, device=device)
            for lib, fn in calls.items():
                with peak_memory(device) as peak:
                    fn(0)
                rec[f"{lib}_{op}_s"] = timed[lib]["median_s"]
                rec[f"{lib}_{op}_min_s"] = timed[lib]["min_s"]
                rec[f"{lib}_{op}_times_s"] = timed[lib]["times_s"]
                rec[f"{lib}_{op}_peak_extra_bytes"] = peak.extra
        # same run, same inputs: identical bytes and values
        (p_m, s_m), (p_b, s_b) = quantized["minilora"][0], quantized["bitsandbytes"][0]
        rec["identical_packed"] = bool(torch.equal(p_m, p_b))
        rec["identical_absmax"] = bool(torch.equal(s_m.absmax, s_b.absmax)) and bool(
            torch.equal(s_m.state2.absmax, s_b.state2.absmax)
        )
        deq_m = libs["minilora"]["dequantize"](p_m, s_m)
        deq_b = libs["bitsandbytes"]["dequantize"](p_b, s_b).reshape(deq_m.shape)
        rec["identical_dequantized"] = bool(torch.equal(deq_m, deq_b))
        rec["differing_packed_codes"] = int((p_m.reshape(-1) != p_b.reshape(-1)).sum())
        rec["differing_absmax_codes"] = int((s_m.absmax != s_b.absmax).sum())
        rec["absmax_codes"] = s_m.absmax.numel()
        rec["max_abs_diff_dequantized"] = float((deq_m.float() - deq_b.float()).abs().max())
        for op in ("quantize", "dequantize"):
            rec[f"{op}_ratio"] = rec[f"minilora_{op}_s"] / rec[f"bitsandbytes_{op}_s"]
            rec[f"{op}_ratio_min"] = rec[f"minilora_{op}_min_s"] / rec[f"bitsandbytes_{op}_min_s"]
            rec[f"{op}_peak_ratio"] = rec[f"minilora_{op}_peak_extra_bytes"] / max(
                1, rec[f"bitsandbytes_{op}_peak_extra_bytes"]
            )
        records.append(rec)
        if device == "cpu":  # where the dequantize time goes, and the least a select-tree kernel takes
            decomposed.append(decompose(quantized, name, (rows_, cols), d_repeats))
        for op in ("quantize", "dequantize"):
            ratio = rec[f"{op}_ratio"]
            rows.append(
                [
                    f"{name} {rows_}x{cols}",
                    op,
                    rec[f"minilora_{op}_s"] * 1e3,
                    rec[f"bitsandbytes_{op}_s"] * 1e3,
                    f"{ratio:.2f}x ({1 / ratio:.2f}x speed-up)" if ratio < 1 else f"{ratio:.2f}x",
                    verdict(ratio),
                    f"{rec[f'{op}_ratio_min']:.2f}x",
                    rec[f"minilora_{op}_peak_extra_bytes"] / 1e6,
                    rec[f"bitsandbytes_{op}_peak_extra_bytes"] / 1e6,
                    rec["input_bytes"] / 1e6,
                    rec["identical_packed"] and rec["identical_absmax"] and rec["identical_dequantized"],
                    rec[f"minilora_{op}_first_call_s"] * 1e3 if op == "dequantize" else "-",
                ]
            )
    report.data["shapes"] = records
    report.table(
        "NF4 + double quant, blocksize 64, bf16 weights (median ms)",
        [
            "weight",
            "op",
            "minilora ms",
            "bitsandbytes ms",
            "ratio (minilora/bnb time)",
            "verdict",
            "ratio of fastest calls",
            "minilora peak extra MB",
            "bnb peak extra MB",
            "input MB",
            "identical",
            "minilora first call ms",
        ],
        rows,
        note=f"Median of {q_repeats} (quantize) / {d_repeats} (dequantize) repeats after warm-up, interleaved, "
        f"{n_inputs} rotating inputs. Peak extra = "
        + (
            "resident memory added at the peak of one call (VmHWM reset before it), allocator included."
            if device == "cpu"
            else "GPU memory (torch.cuda.max_memory_allocated) added at the peak of one call; timed calls synchronized."
        )
        + " The ratio of the fastest calls is less disturbed by "
        "other processes on the shared cores than the median. identical = packed codes, absmax, nested absmax and "
        "the dequantized tensor are equal bit for bit between the two libraries in this run. minilora first call = "
        "its first dequantize in the process, timed before the warm-up: on CPU it includes compiling the "
        "dequantize kernel (torch.compile, a few seconds; later processes reuse Inductor's on-disk cache); one "
        "compile serves every later shape, so only the first weight pays it. The medians exclude it.",
    )
    if decomposed:
        report.data["decomposed"] = decomposed
        add_section(report, decomposed, d_repeats)
    for rec in records:
        for op in ("quantize", "dequantize"):
            if rec[f"{op}_ratio"] > 1.03:
                report.note(
                    f"minilora's {op} of {rec['weight']} is SLOWER than bitsandbytes: "
                    f"{rec[f'{op}_ratio']:.2f}x its time."
                )
            if rec[f"{op}_peak_ratio"] > 1.1 and rec[f"minilora_{op}_peak_extra_bytes"] > 1e6:
                report.note(
                    f"minilora's {op} of {rec['weight']} is HEAVIER than bitsandbytes at its peak: "
                    f"{rec[f'minilora_{op}_peak_extra_bytes'] / 1e6:.0f} MB vs "
                    f"{rec[f'bitsandbytes_{op}_peak_extra_bytes'] / 1e6:.0f} MB extra."
                )
        if device != "cpu" and not (rec["identical_packed"] and rec["identical_absmax"]):
            report.note(
                f"{rec['weight']}: NOT identical to bitsandbytes' CUDA kernel: {rec['differing_packed_codes']:,} "
                f"packed bytes and {rec['differing_absmax_codes']:,} of {rec['absmax_codes']:,} nested absmax "
                f"codes differ; max abs diff of the dequantized weights {rec['max_abs_diff_dequantized']:.3e}."
            )
        target = "meets" if rec["quantize_ratio"] <= 0.5 else "MISSES"
        target = f"{target} the >= 2x CPU target" if device == "cpu" else "GPU"
        report.note(
            f"{rec['weight']}: quantize speed-up {1 / rec['quantize_ratio']:.2f}x ({target}); "
            f"dequantize {'no slower' if rec['dequantize_ratio'] <= 1.03 else 'SLOWER'} "
            f"({rec['dequantize_ratio']:.2f}x bitsandbytes' time)."
        )
    try:
        _plot(report, records)
    except ImportError as err:
        report.note(f"No figure: {err}.")
    return report.write()


def _plot(report: Report, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, op in zip(axes, ("quantize", "dequantize"), strict=True):
        labels = [r["weight"] for r in records]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r[f"minilora_{op}_s"] * 1e3 for r in records], 0.4, label="minilora")
        ax.bar([i + 0.2 for i in x], [r[f"bitsandbytes_{op}_s"] * 1e3 for r in records], 0.4, label="bitsandbytes")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"NF4+DQ {op}, bf16, {report.tag}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(report.figure("times"), dpi=110)
    plt.close(fig)
