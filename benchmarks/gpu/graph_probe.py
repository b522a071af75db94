"""Which parts of the QLoRA step break CUDA-graph capture? One variant per process (a failed capture can
leave the context unusable). Diagnostic for benchmarks/gpu/NOTES.md; prints one line per variant.

    python3 -m benchmarks.gpu.graph_probe [variant ...]
"""

from __future__ import annotations

import subprocess
import sys
import traceback

import torch

VARIANTS = ["lm_graph_first", "lm_graph_last", "lm_graph_after_fast", "lm_graph_after_reference"]
ORDERS = {
    "lm_graph_first": ("fast_graph", "fast", "reference", "reference_graphsafe"),
    "lm_graph_last": ("fast", "reference", "fast_graph", "reference_graphsafe"),
    "lm_graph_after_fast": ("fast", "fast_graph"),
    "lm_graph_after_reference": ("reference", "fast_graph"),
}


def run(variant: str) -> None:
    if variant in ORDERS:  # qlora_step.loss_match with its modes in this order
        from qlora_step import loss_match

        out = loss_match(20, ORDERS[variant])
        print(f"PROBE {variant}: ok {out.get('graph', out.get('max_abs_diff'))}", flush=True)
        return
    import torch.nn.functional as F
    from qlora_step import build_minilora

    from minilora.kernels import reference_mode
    from minilora.kernels.loss import chunked_cross_entropy
    from minilora.train.cuda_graph import CUDAGraphStep

    torch.manual_seed(0)
    model = build_minilora(2)
    if variant == "fast_chunked_no_ckpt":
        model.gradient_checkpointing = False
    if variant == "fast_fp32":
        model.float()

    def loss_fn(m, ids):
        hidden = m.model(ids)[:, :-1]
        if variant == "fast_plain_ce":
            logits = m.lm_head(hidden).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return chunked_cross_entropy(hidden, m.lm_head.weight, ids[:, 1:], chunk_rows=1024)

    params = [p for p in model.parameters() if p.requires_grad]
    if variant.startswith("after_eager"):  # what loss_match does before its graphed run
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, 128256, (2, 128), device="cuda")
        with reference_mode(variant.startswith("after_eager_reference")):
            for _ in range(2):
                loss_fn(model, ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if variant.endswith("seed"):
            torch.manual_seed(123)
    step = CUDAGraphStep(model, torch.optim.AdamW(params, lr=1e-4, capturable=True), loss_fn)
    ids = torch.randint(0, 128256, (2, 128), device="cuda")
    with reference_mode(variant.startswith("reference")) if not variant.startswith("after") else reference_mode(False):
        losses = [float(step(ids)) for _ in range(3)]
    print(f"PROBE {variant}: ok {losses}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        try:
            run(sys.argv[2])
        except Exception as err:
            tb = traceback.format_exc().splitlines()
            print(f"PROBE {sys.argv[2]}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            print("\n".join(tb[-30:]), flush=True)
        sys.exit(0)
    for v in sys.argv[1:] or VARIANTS:
        subprocess.run([sys.executable, "-m", __spec__.name, "--one", v], timeout=240, check=False)
