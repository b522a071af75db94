# ruff: noqa: B023  (every closure below is timed at once, inside the iteration that made its tensors)
"""Probe for issue 15's memory target: can a frozen input embedding live in pinned host memory and still be
read inside the CUDA-graph training step?

At 4x182 tokens both stacks hold the same ~5.7 GB of weights, 1.05 GB of it Llama-3.1-8B's bf16 input embedding
(128256 x 4096); 0.8x of the reference's peak (7.42 GB) is 5.94 GB, below what minilora holds with the table
on the card. The table is frozen and a step reads only its rows (728 x 8 KB = 6 MB). With unified addressing a
kernel can read pinned host memory directly (zero-copy, over PCIe), so the gather could stay inside the graph.

This probe answers, on the device, in one process:
  1. does a Triton gather kernel accept the pinned CPU tensor (its host pointer) and give the rows exactly;
  2. does it work inside a captured CUDA graph, with the ids changed between replays;
  3. how long the gather of 4x182 and 1x2048 rows takes (GPU us), against the same gather from device memory.

    python3 -m benchmarks.gpu.probe_host_embedding --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.harness import bench_us, environment, hardware_tag


@triton.jit
def _gather_rows(table_ptr, ids_ptr, out_ptr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    token = tl.load(ids_ptr + row).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(out_ptr + row * C + cols, tl.load(table_ptr + token * C + cols, mask=cols < C), mask=cols < C)


def gather(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _gather_rows[(ids.numel(),)](table, ids, out, C=table.shape[1], BLOCK_C=1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    V, C = 128256, 4096
    record: dict = {"env": environment(), "results": {}}
    table_dev = torch.randn(V, C, device="cuda", dtype=torch.bfloat16)
    table_host = table_dev.cpu().pin_memory()
    for tokens in (4 * 182, 2048):
        ids = torch.randint(0, V, (tokens,), device="cuda")
        out = torch.empty(tokens, C, device="cuda", dtype=torch.bfloat16)
        res: dict = {}
        try:
            gather(table_host, ids, out)
            torch.cuda.synchronize()
            res["host_exact"] = bool(torch.equal(out, table_dev[ids]))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gather(table_host, ids, out)
            ids.copy_(torch.randint(0, V, (tokens,), device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            res["graph_exact_after_new_ids"] = bool(torch.equal(out, table_dev[ids]))
            res["host_us"] = bench_us(graph.replay)
        except Exception as e:  # the answer to question 1 or 2 may be no
            res["host_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        res["device_us"] = bench_us(lambda: gather(table_dev, ids, out))
        res["torch_index_device_us"] = bench_us(lambda: table_dev[ids])
        record["results"][f"{tokens} rows"] = res
        print(tokens, json.dumps(res), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"probe-host-embedding-{hardware_tag()}.json").write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
