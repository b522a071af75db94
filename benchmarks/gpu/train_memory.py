"""GPU: minilora.memory_train's training-step estimate against torch.cuda.max_memory_allocated at 8B shapes.

Llama-3.1-8B shapes with random weights (as benchmarks/gpu/qlora_step.py builds them: bfloat16, every
decoder Linear NF4 + double quant with bfloat16 compute), LoRA r=32 alpha=64 on q,k,v,o (fp32 adapters,
no dropout), AdamW; steps as minilora.train.loop runs them in eager mode (causal_lm_loss with every
position learned, backward, clipping, AdamW, zero_grad), no autocast. Cases: 4 x 182 and 1 x 2048 tokens,
each with and without gradient checkpointing; `--steps` steps per case (the first creates the AdamW
states). Measured: the peak of torch.cuda.max_memory_allocated over the case's steps (weights included),
against the estimate's total. One model serves every case; between cases the optimizer and gradients are
freed and the peak counter reset.

    python3 -m benchmarks.gpu.train_memory --out DIR      # -> DIR/train-memory-<card>.json and .md

A few steps per case: about a minute on an H100 after the model is built.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, hardware_tag, md_table, write_results

LLAMA8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = [(4, 182, False), (4, 182, True), (1, 2048, False), (1, 2048, True)]


def build(layers: int, device: str = "cuda") -> torch.nn.Module:
    from minilora.lora import add_lora
    from minilora.models import LlamaForCausalLM, ModelConfig
    from minilora.nn import Linear4bit, replace_linears

    cfg = ModelConfig(
        head_dim=LLAMA8B["hidden_size"] // LLAMA8B["num_attention_heads"], **{**LLAMA8B, "num_hidden_layers": layers}
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:  # quantize layer by layer, on the GPU
        replace_linears(layer, lambda name, lin: Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16))
    add_lora(model, r=32, alpha=64, target_modules=list(TARGETS), adapter_dtype=torch.float32)
    return model.train()


def measure(model: torch.nn.Module, batch: int, seq: int, checkpointing: bool, steps: int) -> dict:
    from minilora.train.data import Batch
    from minilora.train.loop import causal_lm_loss

    model.gradient_checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, LLAMA8B["vocab_size"], (batch, seq), device="cuda", generator=gen)
    data = Batch(ids, ids.clone(), torch.ones_like(ids))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt = torch.optim.AdamW(params, lr=1e-4)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss_sum, n = causal_lm_loss(model, data)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n)
    torch.cuda.synchronize()
    result = {
        "allocated_before": before,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "seconds": time.perf_counter() - t0,
        "losses": losses,
    }
    del opt
    model.zero_grad(set_to_none=True)
    return result


def main() -> None:
    from minilora.memory_train import TrainSetup, train_footprint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for train-memory-<card>.json/.md")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3.1-8B)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    t0 = time.perf_counter()
    model = build(args.layers)
    built_s = time.perf_counter() - t0
    config = {**LLAMA8B, "num_hidden_layers": args.layers}
    rows, cases = [], []
    for batch, seq, ckpt in CASES:
        setup = TrainSetup(
            r=32, targets=TARGETS, batch=batch, seq=seq, gradient_checkpointing=ckpt, dtype=torch.bfloat16
        )
        fp = train_footprint(config, setup)
        try:
            measured = measure(model, batch, seq, ckpt, args.steps)
        except torch.OutOfMemoryError as e:
            measured = {"error": f"out of memory: {e}"}
            model.zero_grad(set_to_none=True)
        error = fp.total / measured["peak_allocated"] - 1 if "peak_allocated" in measured else None
        cases.append({"batch": batch, "seq": seq, "gradient_checkpointing": ckpt, "estimate_items": fp.items,
                      "estimate_total": fp.total, **measured, "relative_error": error})  # fmt: skip
        print(json.dumps(cases[-1], default=str), flush=True)
        peak = measured.get("peak_allocated")
        rows.append([
            f"{batch} x {seq}", "with" if ckpt else "without", f"{fp.total / 1e9:.2f}",
            f"{peak / 1e9:.2f}" if peak else measured.get("error", "")[:60],
            f"{100 * error:+.1f}%" if error is not None else "-",
            ("within 15%" if abs(error) <= 0.15 else "OFF by more than 15%") if error is not None else "-",
        ])  # fmt: skip
    record = {"environment": environment(), "layers": args.layers, "steps": args.steps, "build_s": built_s,
              "wall_s": time.perf_counter() - t0, "cases": cases}  # fmt: skip
    table = md_table(["tokens", "gradient checkpointing", "estimate GB", "measured peak GB", "error", "verdict"], rows)
    md = (
        f"# Training-step memory, Llama-3.1-8B shapes ({args.layers} layers), NF4+DQ, LoRA r=32 q,k,v,o, bf16\n\n"
        f"- command: `python3 -m benchmarks.gpu.train_memory {' '.join(sys.argv[1:])}`\n"
        f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n"
        f"- {args.steps} eager steps per case (causal_lm_loss, AdamW); measured = torch.cuda.max_memory_allocated "
        "over them; estimate = minilora.memory_train (meta-device trace)\n\n" + table + "\n"
    )
    write_results(args.out, f"train-memory-{hardware_tag()}", record, md)
    print(md)


if __name__ == "__main__":
    main()
