"""Suite `generate`: greedy decoding on SmolLM2-135M-Instruct, minilora against transformers (+ bitsandbytes).

For each precision, fp32 and NF4 + double quant (float32 compute), each library runs in its own process: it
loads the model, warms up with one short generation, then times `repeats` greedy generations of NEW tokens
after a PROMPT-token prompt, with a KV cache on both sides (minilora `generate`, transformers
`model.generate(do_sample=False)`; no stop token, so both make exactly NEW tokens). For NF4, transformers runs
twice: as it comes (bitsandbytes' CPU fast path on AVX512-BF16 machines, which repacks the weight and rounds each
absmax to bfloat16: faster, and ~1% off in the logits) and with that path switched off
(`support_avx512bf16_for_cpu = False`: float32 dequantize + matmul, the format's exact values, as minilora
computes and as tests/test_loading.py compares). Reported: the median
time per generation, decode tokens/s (NEW / time: prefill included), the time to the first token (a
generation of one token), and how many of the NEW token ids the two libraries share from the start.
Greedy decoding of the same weights gives the same ids until a float near-tie (the two sum in different
orders) flips one; everything after it may differ.

`--smoke` runs a tiny random Llama (transformers' save_pretrained) with a few tokens.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Report, progress, run_child, verdict

FULL = {"prompt": 128, "new": 64, "repeats": 5}
SMOKE = {"prompt": 8, "new": 4, "repeats": 1}
PRECISIONS = ("fp32", "nf4", "nf4-exact")  # nf4-exact: bitsandbytes without its bfloat16-absmax fast path


def prompt_ids(directory: str, length: int) -> list[int]:
    """The first `length` tokens of the held-out text (the smoke model carries SmolLM2's tokenizer too)."""
    from benchmarks.cpu.quality import heldout_ids

    return heldout_ids(Path(directory), length)[0].tolist()


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def child_minilora(directory: str, precision: str, prompt: int, new: int, repeats: int) -> dict[str, Any]:
    from minilora.generate import SamplingConfig, generate
    from minilora.loading import from_pretrained

    quant = {"quantize": "nf4", "double_quant": True} if precision.startswith("nf4") else {}
    model = from_pretrained(directory, dtype=torch.float32, **quant)
    ids = prompt_ids(directory, prompt)
    with torch.inference_mode():
        first_s, _ = _timed(lambda: generate(model, ids, SamplingConfig(max_new_tokens=1)), repeats)
        total_s, out = _timed(lambda: generate(model, ids, SamplingConfig(max_new_tokens=new)), repeats)
    return {"first_token_s": first_s, "generate_s": total_s, "new_ids": out}


def child_reference(directory: str, precision: str, prompt: int, new: int, repeats: int) -> dict[str, Any]:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if precision.startswith("nf4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
    if precision == "nf4-exact":
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    ids = torch.tensor([prompt_ids(directory, prompt)])
    settings = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, "use_cache": True}

    def run(n: int) -> list[int]:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **settings)
        return out[0, ids.shape[1] :].tolist()

    with torch.inference_mode():
        first_s, _ = _timed(lambda: run(1), repeats)
        total_s, out = _timed(lambda: run(new), repeats)
    return {"first_token_s": first_s, "generate_s": total_s, "new_ids": out}


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    report = Report("generate", argv, out, smoke, device)
    if device != "cpu":
        report.note("The generate suite runs on CPU only (the SmolLM2 checkpoint is not on the GPU machine).")
        return report.write()
    if smoke:
        from benchmarks.harness import tiny_checkpoint

        directory = str(tiny_checkpoint(Path(report.out) / "tiny-llama"))
        settings = SMOKE
    else:
        from benchmarks.cpu.quality import smollm2_dir

        directory = str(smollm2_dir())
        settings = FULL
    records, rows = [], []
    for precision in progress(PRECISIONS, "generate"):
        args = {"directory": directory, "precision": precision, **settings, "threads": torch.get_num_threads()}
        # minilora has one NF4 path: its nf4-exact row reuses the nf4 run
        m = records[-1]["minilora"] if precision == "nf4-exact" else run_child("generate", "minilora", args)
        r = run_child("generate", "reference", args)
        rec = {"precision": precision, "settings": settings, "minilora": m, "reference": r}
        rec["shared_prefix"] = _shared_prefix(m["new_ids"], r["new_ids"])
        rec["ratio"] = m["generate_s"] / r["generate_s"]
        records.append(rec)
        new = settings["new"]
        rows.append(
            [
                precision,
                m["generate_s"] * 1e3,
                r["generate_s"] * 1e3,
                f"{rec['ratio']:.2f}x",
                verdict(rec["ratio"]),
                new / m["generate_s"],
                new / r["generate_s"],
                m["first_token_s"] * 1e3,
                r["first_token_s"] * 1e3,
                f"{rec['shared_prefix']} / {new}",
            ]
        )
    report.data["generate"] = records
    name = "tiny random Llama" if smoke else "SmolLM2-135M-Instruct"
    report.table(
        f"Greedy generation, {name}, {settings['prompt']}-token prompt + {settings['new']} new tokens, CPU",
        [
            "precision",
            "minilora ms",
            "transformers ms",
            "ratio (minilora/reference time)",
            "verdict",
            "minilora tokens/s",
            "transformers tokens/s",
            "minilora first token ms",
            "transformers first token ms",
            "same ids from the start",
        ],
        rows,
        note=f"Median of {settings['repeats']} generations after one warm-up, each library in its own process, "
        "float32 compute, KV cache; NF4 = NF4 + double quant (transformers: bitsandbytes' Linear4bit; nf4: as it "
        "comes, with its bfloat16-absmax CPU fast path where the CPU has AVX512-BF16; nf4-exact: that path off). "
        "tokens/s = new tokens / whole generation time (prefill included). 'same ids from the start': how many "
        "of the new token ids agree before the first difference.",
    )
    for rec in records:
        if rec["ratio"] > 1.03:
            report.note(f"{rec['precision']}: minilora SLOWER, {rec['ratio']:.2f}x transformers' time.")
        if rec["shared_prefix"] < settings["new"]:
            why = (
                "bitsandbytes' CPU fast path rounds each absmax to bfloat16, which moves its logits by ~1%"
                if rec["precision"] == "nf4"
                else "a float near-tie decided differently; the rest follows from it"
            )
            report.note(
                f"{rec['precision']}: the generated ids part after {rec['shared_prefix']} of {settings['new']} "
                f"tokens ({why})."
            )
    return report.write()
