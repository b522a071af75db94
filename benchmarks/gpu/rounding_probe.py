"""Diagnostic: which float division do bitsandbytes' CUDA quantizers use? (quality-h200: codes differ on CUDA.)

bitsandbytes builds its CUDA kernels with --use_fast_math, so `1.0f / absmax` (4-bit blockwise) and
`__fdividef(127.0f, absmax)` (int8 rows) are not IEEE divisions. This script quantizes random weights with
bitsandbytes on the GPU and re-derives the codes with each candidate PTX division (inline asm in a Triton
kernel), counting the codes that differ. The candidate with 0 differences is what minilora must use on CUDA
to store the same bytes.

    python3 -m benchmarks.gpu.rounding_probe          (prints a table; needs CUDA, triton, bitsandbytes)

Found on the H200 (session 3): every fast division (div.full.ftz, div.approx.ftz, rcp.approx.ftz times the
numerator) gave 0 differing FP4 and int8 codes, IEEE division 254-3,641 FP4 and 134-688 int8. In that run the
NF4 rule still used the CPU path's float32 midpoints and differed in 3-4 codes on float32 weights, all on a
boundary value; bitsandbytes' decimal boundaries read once as float32 (cuda_rounding.float32_from_decimal) explained
them, and the rule this script now takes from minilora includes them. minilora/kernels/fastdiv.py takes
div.approx.ftz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

VARIANTS = {  # name -> PTX computing $0 = $1 / $2 (numerator, denominator: float32 registers)
    "ieee (div.rn)": "div.rn.f32 $0, $1, $2;",
    "div.full.ftz": "div.full.ftz.f32 $0, $1, $2;",
    "div.approx.ftz": "div.approx.ftz.f32 $0, $1, $2;",
    "num * rcp.approx.ftz": "{ .reg .f32 r; rcp.approx.ftz.f32 r, $2; mul.ftz.f32 $0, $1, r; }",
}


@triton.jit
def _divide_kernel(num_ptr, den_ptr, out_ptr, n, ASM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    num = tl.load(num_ptr + offs, mask=mask, other=1.0)
    den = tl.load(den_ptr + offs, mask=mask, other=1.0)
    q = tl.inline_asm_elementwise(ASM, "=r,r,r", [num, den], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(out_ptr + offs, q, mask=mask)


def divide(num: float, den: torch.Tensor, asm: str) -> torch.Tensor:
    den = den.float().contiguous()
    nums = torch.full_like(den, num)
    out = torch.empty_like(den)
    _divide_kernel[(triton.cdiv(den.numel(), 1024),)](nums, den, out, den.numel(), ASM=asm, BLOCK=1024)
    return out


def codes_4bit(x: torch.Tensor, recip: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """bitsandbytes' CUDA rule (minilora.quant.blockwise) on x scaled by the given reciprocals of its absmax."""
    from minilora.quant import cuda_rounding

    n = x.numel()
    flat = torch.nn.functional.pad(x.reshape(-1).float(), (0, (-n) % blocksize)).view(-1, blocksize)
    scaled = flat * recip[:, None]
    scaled = torch.where(scaled.abs() < 2.0**-126, torch.zeros_like(scaled), scaled).reshape(-1)[:n]  # ftz
    return cuda_rounding.code_index(scaled, quant_type)


def show_mismatches(x, absmax, recip, mine, theirs, blocksize: int, most: int = 5) -> None:
    """Print the first differing codes with the numbers that decided them."""
    for i in (mine != theirs).nonzero().view(-1)[:most].tolist():
        b = i // blocksize
        v = x.reshape(-1)[i].float()
        print(
            f"  #{i} {x.dtype} bs{blocksize}: x={v.item()!r} absmax={absmax[b].item()!r} recip={recip[b].item()!r}"
            f" x*recip={(v * recip[b]).item()!r} x/absmax={(v / absmax[b]).item()!r} mine={mine[i].item()}"
            f" bnb={theirs[i].item()}"
        )


def main() -> None:
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(4096, 4096, device="cuda") * 0.02
        x[7, :128] = 0.0  # whole zero blocks
        x[9, :64] = 1e-30  # tiny
        x = x.to(dtype)
        for quant_type in ("nf4", "fp4"):
            for blocksize in (64, 4096):
                packed, state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
                theirs = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[: x.numel()]
                for name, asm in VARIANTS.items():
                    recip = divide(1.0, state.absmax, asm)
                    mine = codes_4bit(x, recip, blocksize, quant_type)
                    rows.append((f"{quant_type} bs{blocksize} {dtype}", name, int((mine != theirs).sum())))
                    if name == "div.full.ftz":
                        show_mismatches(x, state.absmax, recip, mine, theirs, blocksize)
    for threshold in (0.0, 6.0):
        x = (torch.randn(4096, 4096, device="cuda") * 0.5).half()
        x[:, 11] *= 40  # an outlier column
        cb, scb, _ = bnbF.int8_vectorwise_quant(x, threshold=threshold)
        xf = x.float()
        keep = xf.abs() < threshold if threshold > 0 else torch.ones_like(xf, dtype=torch.bool)
        absmax = xf.masked_fill(~keep, 0.0).abs().amax(dim=1)
        for name, asm in VARIANTS.items():
            scale = divide(127.0, absmax, asm)
            q = torch.round(xf * scale[:, None]).masked_fill(~keep, 0.0)
            if threshold > 0:
                q[:, (~keep).any(dim=0)] = 0
            mine = q.to(torch.int8)
            rows.append((f"int8 threshold {threshold}", name, int((mine != cb).sum())))
        rows.append((f"int8 threshold {threshold}", "SCB equal", int(torch.equal(absmax, scb.float()))))
    width = max(len(r[0]) for r in rows)
    for case, name, count in rows:
        print(f"{case:<{width}}  {name:<22} {count:>10,}")


if __name__ == "__main__":
    main()
