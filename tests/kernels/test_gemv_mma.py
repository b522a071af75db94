"""The register-decode tensor-core GEMV (minilora/kernels/gemv_mma.py) on the CPU.

The kernel's PTX cannot run here, so its step is run by a small emulator of the instructions it uses (and, or,
shr, mov, prmt, and mma.m16n8k16's fragments as the PTX ISA defines them) over one warp's 32 lanes, fed exactly
what the kernel loads: the reordered weight, x's words and the table's byte planes. Against the sum it
must equal, this checks the asm text, the selectors, `plane_words` and `mma_layout_of` together.
The plain-Triton twin of the step runs in the interpreter test (test_dispatch.py); the GPU tests run the PTX.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton")  # the kernel module imports triton (not installed with the CPU wheel)

from minilora.kernels import gemv_mma  # noqa: E402
from minilora.quant import quantize_4bit  # noqa: E402


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 default mode: byte i of the result is byte (c >> 4i) & 7 of {b, a}, or its sign if bit 3."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 15
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _halves(word: int, dtype: torch.dtype) -> tuple[float, float]:
    t = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype)
    return float(t[0]), float(t[1])


def _run_warp(asm: str, inputs: list[list[int]], dtype: torch.dtype) -> list[list[float]]:
    """Run the step's PTX on 32 lanes; inputs[lane] = the 20 input registers ($4..$23); returns D per lane."""
    regs = [{f"${4 + i}": v & 0xFFFFFFFF for i, v in enumerate(lane)} for lane in inputs]
    f32 = [dict() for _ in range(32)]
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op.startswith("mma.sync"):
            groups = [g.replace(" ", "").split(",") for g in re.findall(r"\{([^}]*)\}", rest)]
            d, a, b, c = groups
            # fragments (PTX ISA, m16n8k16, 16-bit A/B, f32 C/D): lane 4q + t
            amat, bmat = np.zeros((16, 16)), np.zeros((16, 8))
            for lane in range(32):
                q, t = divmod(lane, 4)
                for r, (row, k) in enumerate([(q, 2 * t), (q + 8, 2 * t), (q, 2 * t + 8), (q + 8, 2 * t + 8)]):
                    amat[row, k], amat[row, k + 1] = _halves(regs[lane][a[r]], dtype)
                for r, k in enumerate([2 * t, 2 * t + 8]):
                    bmat[k, q], bmat[k + 1, q] = _halves(regs[lane][b[r]], dtype)
            prod = amat @ bmat
            for lane in range(32):
                q, t = divmod(lane, 4)
                for r, (row, col) in enumerate([(q, 2 * t), (q, 2 * t + 1), (q + 8, 2 * t), (q + 8, 2 * t + 1)]):
                    f32[lane][d[r]] = f32[lane][c[r]] + prod[row, col]
            continue
        args = [s.strip() for s in rest.split(",")]
        for lane in range(32):
            r, f = regs[lane], f32[lane]

            def val(s: str, r: dict = r) -> int:
                return int(s, 16) if s.startswith("0x") else int(s) if s.isdigit() else r[s]

            if op == "mov.b32" and args[1] == "0f00000000":
                f[args[0]] = 0.0
            elif op == "mov.b32":
                f[args[0]] = f[args[1]]
            elif op == "and.b32":
                r[args[0]] = val(args[1]) & val(args[2])
            elif op == "or.b32":
                r[args[0]] = val(args[1]) | val(args[2])
            elif op == "shr.u32":
                r[args[0]] = val(args[1]) >> val(args[2])
            elif op == "prmt.b32":
                r[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
            else:
                raise AssertionError(f"the emulator does not know {op}")
    return [[f32[lane][f"${i}"] for i in range(4)] for lane in range(32)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_steps_ptx_computes_the_blocks_sums(quant_type: str, dtype: torch.dtype, m: int) -> None:
    torch.manual_seed(m)
    n, k = 32, 128  # two row groups, two steps
    packed, state = quantize_4bit(torch.randn(n, k), 64, quant_type, False)
    nib = torch.stack([packed.reshape(n, k // 2) >> 4, packed.reshape(n, k // 2) & 15], -1).reshape(n, k).long()
    code16 = state.code.to(dtype).double()
    x = torch.randn(m, k).to(dtype)
    words = gemv_mma.mma_layout_of(packed, n, k).tolist()  # (N/16, S, 32, 4)
    xw = x.view(torch.int32).tolist()  # (M, K/2) words: two inputs each
    planes = gemv_mma.plane_words(state.code, dtype)
    asm = gemv_mma._asm(dtype == torch.float16)
    for g in range(n // 16):
        for s in range(k // 64):
            inputs = []
            for lane in range(32):
                q, t = divmod(lane, 4)
                row = xw[min(q, m - 1)]
                bregs = [row[32 * s + t + 4 * e] for e in range(8)]  # what the kernel loads for B: t, t+4, .., t+28
                inputs.append(words[g][s][lane] + bregs + list(planes[:4]) + list(planes[4:]))
            d = _run_warp(asm, inputs, dtype)
            for lane in range(32):
                q, t = divmod(lane, 4)
                for r, (row, col) in enumerate([(q, 2 * t), (q, 2 * t + 1), (q + 8, 2 * t), (q + 8, 2 * t + 1)]):
                    ks = slice(64 * s, 64 * s + 64)
                    want = float((code16[nib[16 * g + row, ks]] * x[min(col, m - 1), ks].double()).sum())
                    assert d[lane][r] == pytest.approx(want, rel=1e-9, abs=1e-9), (g, s, lane, r)


def test_the_layout_is_a_permutation_with_an_inverse() -> None:
    packed, _ = quantize_4bit(torch.randn(48, 256), 64, "nf4", True)
    words = gemv_mma.mma_layout_of(packed, 48, 256)
    assert words.shape == (3, 4, 32, 4) and words.dtype == torch.int32
    assert torch.equal(gemv_mma.packed_of_mma_layout(words, 48, 256), packed.reshape(-1))
    assert torch.equal(torch.sort(words.reshape(-1).view(torch.uint8)).values, torch.sort(packed.reshape(-1)).values)


@pytest.mark.parametrize("n, k, warps", [(14336, 4096, 4), (4096, 4096, 16), (1024, 4096, 16), (4096, 14336, 16),
                                         (32, 128, 2)])  # fmt: skip
def test_warps_divide_the_steps(n: int, k: int, warps: int) -> None:
    assert gemv_mma.warps_for(n, k) == warps and (k // 64) % warps == 0


def test_an_odd_count_of_steps_is_not_taken():
    # 3 steps of 64 would leave one warp per program, which the kernel refuses (gemv_mma.MIN_WARPS)
    _, state = quantize_4bit(torch.randn(32, 192), 64, "nf4")
    assert not gemv_mma.mma_supported(torch.randn(1, 192, dtype=torch.bfloat16), state)


@pytest.mark.parametrize("warps", [1, 2, 4])
def test_each_thread_holds_one_rows_four_fragment_words(warps: int):
    """The PTX takes a thread's 4 registers as one row's 4 words. Compiled for sm_90 here (no GPU), the inline
    asm's operands must be laid out so: [1, 1] or [1, 4] per thread over 32 lanes of rows. One warp gets [4, 1]
    over [8, 4], the layout that gave wrong products on an H100 (2026-12-08), hence gemv_mma.MIN_WARPS = 2."""
    from benchmarks.gpu.sass_loop import BASE_SIG, POINTERS, compile_sm90

    planes = {f"th{i}": "i32" for i in range(4)} | {f"tl{i}": "i32" for i in range(4)}
    out = compile_sm90(
        gemv_mma._gemv_mma_kernel,
        dict(BASE_SIG, w_ptr="*i32", x_ptr="*i32", code16_ptr="*fp32", stride_xw="i32", **planes),
        dict(M=1, K=4096, BS=64, NESTED=True, NESTED_BS=256, F16=False, W=warps, ASM=True, LORA=False, R=1, R_PAD=1),
        warps,
        POINTERS + ["w_ptr", "x_ptr", "code16_ptr", "stride_xw", "stride_ym", "stride_hm"],
    )
    ttgir = out["ttgir"]
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{.*\}>)", ttgir, re.M))
    asm = next(line for line in ttgir.splitlines() if "elementwise_inline_asm" in line)
    layout = aliases[re.search(r"-> tensor<\d+x4xf32, (#\w+)>", asm).group(1)]
    per_row = re.search(r"sizePerThread = \[1, [14]\], threadsPerWarp = \[32, 1\]", layout) is not None
    assert per_row == (warps >= gemv_mma.MIN_WARPS), layout
