"""Where the CPU dequantize time goes, and the least any select-tree kernel can take (part of suite `quant`).

Issue 2 asks minilora's CPU dequantize to be no slower than bitsandbytes'. This section splits one NF4+DQ
dequantize to bfloat16 into its parts, every part timed in the same interleaved loop:

- fresh output: `torch.empty(n, bfloat16).fill_(0)`. Writing a new tensor the first time maps its pages (page
  faults: the kernel zeroes each 4 KB page and maps it). Both libraries return a new tensor, so both pay this.
- each library's kernel alone, writing into an output whose pages are already mapped: bitsandbytes' C++
  kernel (its AVX-512 code, called through its own ctypes entry point, absmax already in float32) and
  minilora's compiled kernel (minilora/kernels/compiled.py, the same bits).
- the select-tree bound: the cheapest lookup loop we could get Inductor to build, with the per-block table of
  16 rounded products `bf16(code[k] * absmax[b])` *handed to it for free* (its own time and memory not
  counted), so the loop only loads, unpacks, selects and stores. Why a select tree: eager PyTorch has no
  vectorized table lookup (index_select, take, embedding and advanced indexing run one element at a time,
  ~3.4 ns each) and Inductor vectorizes selects but not gathers or permutes (an indirect load becomes 16
  scalar loads per vector). Why this tree: 16-bit lanes would halve the selects, but int16 is not among
  Inductor's vectorizable dtypes (such loops fall back to scalar code, ~95 ms for 4096x4096); so both nibbles
  of a byte share one int32 lane, each steering one 16-bit half through bitwise selects (`_tree_floor`). On
  4096x4096 with the output mapped, 2026-11-29: this tree 3.05 ms; two trees of 15 int32 selects on the same
  table 3.8 ms; minilora's shipped kernel (float selects, then multiply and round per element) 5.3-5.9 ms;
  bitsandbytes' AVX-512 kernel (one permute per 16 values) 1.2-1.5 ms. Timed both into a mapped output and
  into a fresh one (what a dequantize returning a new tensor pays at least).
- the two whole `dequantize_4bit` calls.

Every kernel's output is checked equal, bit for bit, to bitsandbytes' dequantized tensor, so the bound is a
real dequantize and not a shortcut. Timings are measured, never asserted on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import Report, bench_pair

_kernels: dict[str, Callable[..., Any]] = {}


def _bitwise_select(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """b where mask's bits are set, a elsewhere (one ternary-logic instruction on AVX-512)."""
    return a ^ ((a ^ b) & mask)


def _tree_floor(packed: torch.Tensor, leaves: torch.Tensor) -> torch.Tensor:
    """(n_blocks, bs/2) uint8 codes, (n_blocks, 16) int32 leaves -> (n_blocks, bs/2) int32, two bfloat16 each.

    A leaf holds the bfloat16 pattern of bf16(code[k] * absmax[b]) in both 16-bit halves. Both nibbles of a byte
    go down one tree together: the high nibble (element 2i) steers the low half of the lane, the low nibble
    (element 2i+1) the high half, so the lane that comes out is already the little-endian pair to store. Each
    level's mask sets a half to all ones when its nibble's bit is set: t = bits at 0 and 16, (t << 16) - t.
    """
    byte = packed.to(torch.int32)
    steer = (byte >> 4) | ((byte & 15) << 16)  # high nibble in bits 0-3, low nibble in bits 16-19
    level = [leaves[:, k : k + 1] for k in range(16)]
    for bit in range(4):
        t = (steer >> bit) & 0x00010001
        mask = (t << 16) - t
        level = [_bitwise_select(level[2 * i], level[2 * i + 1], mask) for i in range(len(level) // 2)]
    return level[0]


def _tree_floor_into(packed: torch.Tensor, leaves: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_tree_floor(packed, leaves))


def _minilora_into(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor) -> None:
    from minilora.kernels.compiled import _dequantize_blocks

    out.copy_(_dequantize_blocks(packed, absmax, code, torch.bfloat16).view(torch.int32))


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn compiled as minilora compiles its kernel (dynamic shapes, PyTorch's own rounding kept)."""
    if fn.__name__ not in _kernels:
        _kernels[fn.__name__] = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
    return _kernels[fn.__name__]


def _bnb_kernel() -> Callable[..., Any] | None:
    """bitsandbytes' CPU NF4 -> bfloat16 kernel (its ctypes entry point), or None where its build lacks one."""
    try:
        from bitsandbytes.cextension import lib

        return lib.cdequantize_blockwise_cpu_nf4_bf16
    except (ImportError, AttributeError):
        return None


def decompose(
    quantized: dict[str, list[tuple[torch.Tensor, Any]]], name: str, shape: tuple[int, int], repeats: int
) -> dict[str, Any]:
    """Time the parts of one weight's dequantize (see the module docstring); returns the record for the json."""
    import bitsandbytes.functional as bnbF

    from minilora.kernels import dequantize_4bit
    from minilora.quant.blockwise import dequantize_absmax

    rows_, cols = shape
    n = rows_ * cols
    blocksize = 64
    n_blocks = n // blocksize
    n_inputs = len(quantized["minilora"])
    code = quantized["minilora"][0][1].code.float()
    inputs = []
    for (p_m, s_m), (p_b, s_b) in zip(quantized["minilora"], quantized["bitsandbytes"], strict=True):
        absmax = dequantize_absmax(s_m)[:n_blocks].contiguous()
        products = (code[None, :] * absmax[:, None]).to(torch.bfloat16)  # (n_blocks, 16), PyTorch's rounding
        bits = products.view(torch.int16).to(torch.int32) & 0xFFFF
        leaves = bits | (bits << 16)
        inputs.append(
            {
                "packed": p_m.reshape(n_blocks, blocksize // 2),
                "absmax": absmax,
                "leaves": leaves,
                "bnb": (p_b, s_b),
                "mini": (p_m, s_m),
                "bnb_absmax": bnbF.dequantize_blockwise(s_b.absmax, s_b.state2) + s_b.offset,
            }
        )
    mapped = torch.zeros(n_blocks, blocksize // 2, dtype=torch.int32)  # pages mapped once, written over and over
    mapped_bnb = torch.zeros(rows_, cols, dtype=torch.bfloat16)
    tree_into, tree_fresh, mini_into = _compiled(_tree_floor_into), _compiled(_tree_floor), _compiled(_minilora_into)
    bnb_kernel = _bnb_kernel()

    def bnb_into(i: int) -> None:
        bnb_kernel(  # the same call bitsandbytes' CPU backend makes, minus its torch.empty
            ctypes.c_void_p(x(i)["bnb"][0].data_ptr()),
            ctypes.c_void_p(x(i)["bnb_absmax"].data_ptr()),
            ctypes.c_void_p(mapped_bnb.data_ptr()),
            ctypes.c_longlong(blocksize),
            ctypes.c_longlong(rows_),
            ctypes.c_longlong(cols),
        )

    def x(i: int) -> dict[str, Any]:
        return inputs[i % n_inputs]

    calls: dict[str, Callable[[int], Any]] = {
        "fresh_output": lambda i: torch.empty(n, dtype=torch.bfloat16).fill_(0),
        "minilora_kernel_mapped": lambda i: mini_into(x(i)["packed"], x(i)["absmax"], code, mapped),
        "tree_floor_mapped": lambda i: tree_into(x(i)["packed"], x(i)["leaves"], mapped),
        "tree_floor_fresh": lambda i: tree_fresh(x(i)["packed"], x(i)["leaves"]),
        "minilora_dequantize": lambda i: dequantize_4bit(*x(i)["mini"]),
        "bitsandbytes_dequantize": lambda i: bnbF.dequantize_4bit(*x(i)["bnb"]),
    }
    if bnb_kernel is not None:
        calls["bitsandbytes_kernel_mapped"] = bnb_into

    # Every kernel computes the real thing: compare with bitsandbytes' dequantized weight, bit for bit.
    reference = bnbF.dequantize_4bit(*inputs[0]["bnb"]).reshape(n_blocks, blocksize).view(torch.int32)
    identical = {}
    for key in ("minilora_kernel_mapped", "tree_floor_mapped"):
        mapped.zero_()
        calls[key](0)
        identical[key] = bool(torch.equal(mapped, reference))
    identical["tree_floor_fresh"] = bool(torch.equal(calls["tree_floor_fresh"](0), reference))
    if bnb_kernel is not None:
        bnb_into(0)
        same = torch.equal(mapped_bnb.view(-1), reference.view(torch.bfloat16).view(-1))
        identical["bitsandbytes_kernel_mapped"] = bool(same)

    timed = bench_pair(calls, repeats, warmup=2)
    rec: dict[str, Any] = {"weight": name, "shape": list(shape), "identical_to_bnb": identical}
    for key, t in timed.items():
        rec[f"{key}_s"] = t["median_s"]
        rec[f"{key}_min_s"] = t["min_s"]
    return rec


LABELS = {
    "fresh_output": "fresh bf16 output, written once (page faults + write)",
    "bitsandbytes_kernel_mapped": "bitsandbytes kernel, output already mapped",
    "minilora_kernel_mapped": "minilora kernel, output already mapped",
    "tree_floor_mapped": "select-tree bound, output already mapped",
    "tree_floor_fresh": "select-tree bound, fresh output",
    "bitsandbytes_dequantize": "bitsandbytes dequantize_4bit (whole call)",
    "minilora_dequantize": "minilora dequantize_4bit (whole call)",
}


def add_section(report: Report, records: list[dict[str, Any]], repeats: int) -> None:
    """The decomposition table and what it implies for the 'no slower' target."""
    header = ["part", *[f"{r['weight']} {r['shape'][0]}x{r['shape'][1]} ms" for r in records], "identical to bnb"]
    rows = []
    for key, label in LABELS.items():
        if not all(f"{key}_s" in r for r in records):
            continue
        same = [r["identical_to_bnb"].get(key) for r in records]
        rows.append([label, *[r[f"{key}_s"] * 1e3 for r in records], "-" if same[0] is None else all(same)])
    report.table(
        "Dequantize to bf16, taken apart (median ms, same interleaved loop)",
        header,
        rows,
        note=f"Median of {repeats} interleaved repeats. The select-tree bound is the cheapest lookup loop we got "
        "Inductor (torch.compile's CPU backend) to build, given its per-block table of rounded products for free; "
        "benchmarks/cpu/dequant_floor.py says which formulations were measured and why PyTorch offers nothing "
        "cheaper for a 16-entry lookup. identical to bnb = that kernel's output equals bitsandbytes' dequantized "
        "weight bit for bit.",
    )
    for r in records:
        bound, bnb = r["tree_floor_fresh_s"], r["bitsandbytes_dequantize_s"]
        report.note(
            f"{r['weight']}: the select-tree bound into a fresh output takes {bound * 1e3:.1f} ms, "
            f"{bound / bnb:.2f}x bitsandbytes' whole dequantize ({bnb * 1e3:.1f} ms); a fresh output alone takes "
            f"{r['fresh_output_s'] * 1e3:.1f} ms."
        )
