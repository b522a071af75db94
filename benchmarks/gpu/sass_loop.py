"""The decode GEMV kernels' inner loop, counted in SASS without a GPU: Triton compiles them for sm_90 on the CPU
(its own ptxas and nvdisasm), and the loop's instructions are counted by opcode.

Issue-bound kernels (gemv.py's, benchmarks/gpu/NOTES.md) are predicted from this count before a device call:
time ~ warp instructions / (SMs x IPC x clock). Both kernels are compiled as the dispatch launches them for
14336x4096 NF4+DQ at M = 1 (the divisibility hints Triton's launcher would give: 16 for every pointer and the
strides). One step covers 16 packed bytes (32 weights) per thread; gemv_mma's loop runs two steps a trip, so its
counts are halved to compare.

    python3 -m benchmarks.gpu.sass_loop --out benchmarks/results      (needs `triton`, no GPU)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.harness import environment, md_table, write_results


def compile_sm90(fn, signature: dict, constants: dict, num_warps: int, div16: list[str]) -> dict:  # type: ignore[no-untyped-def]
    """Compile a @triton.jit kernel for sm_90; returns its "ttgir", "ptx" and "sass" text."""
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    sig = dict(signature, **{k: "constexpr" for k in constants})
    src = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return {"ttgir": ck.asm["ttgir"], "ptx": ck.asm["ptx"], "sass": sass}


def loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of each loop (a backward branch's body), longest first."""
    ops, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ops)
            continue
        m = re.search(r"/\*[0-9a-f]{4,5}\*/\s+(.*?)\s*;", line)
        if m:
            ops.append(m.group(1))
    found = []
    for i, op in enumerate(ops):
        m = re.search(r"BRA\s.*?`\((\.L_x_\d+)\)", op)
        if m and labels.get(m.group(1), len(ops)) <= i:
            body = ops[labels[m.group(1)] : i + 1]
            found.append(collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in body))
    return sorted(found, key=lambda c: -sum(c.values()))


POINTERS = ["absmax_ptr", "code8_ptr", "nested_absmax_ptr", "offset_ptr", "y_ptr", "h_ptr", "b_ptr"]
BASE_SIG = {"absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "code8_ptr": "*fp32", "offset_ptr": "*fp32",
            "y_ptr": "*bf16", "h_ptr": "*bf16", "b_ptr": "*bf16", "scaling": "fp32", "M": "i32", "stride_ym": "i32",
            "stride_hm": "i32"}  # fmt: skip


def kernels() -> dict[str, dict]:
    from minilora.kernels.gemv import _gemv_4bit_kernel
    from minilora.kernels.gemv_mma import _gemv_mma_kernel

    v1 = compile_sm90(
        _gemv_4bit_kernel,
        dict(BASE_SIG, x_ptr="*i32", packed_ptr="*u8", code_ptr="*fp32", N="i32", stride_xw="i32"),
        dict(
            M=1,
            HALF_K=2048,
            HALF_BS=32,
            C=32,
            NESTED=True,
            NESTED_BS=256,
            X_BF16=True,
            BLOCK_M=1,
            BLOCK_N=8,
            BLOCK_KB=256,
            ASM=True,
            LORA=False,
            R=1,
            R_PAD=1,
        ),  # fmt: skip
        4,
        POINTERS + ["x_ptr", "packed_ptr", "code_ptr", "N", "stride_xw", "stride_ym", "stride_hm"],
    )
    planes = {f"th{i}": "i32" for i in range(4)} | {f"tl{i}": "i32" for i in range(4)}
    v3 = compile_sm90(
        _gemv_mma_kernel,
        dict(BASE_SIG, w_ptr="*i32", x_ptr="*i32", code16_ptr="*fp32", stride_xw="i32", **planes),
        dict(M=1, K=4096, BS=64, NESTED=True, NESTED_BS=256, F16=False, W=4, ASM=True, LORA=False, R=1, R_PAD=1),
        4,
        POINTERS + ["w_ptr", "x_ptr", "code16_ptr", "stride_xw", "stride_ym", "stride_hm"],
    )
    return {"gemv.py (v1, fma)": (v1, 1), "gemv_mma.py (v3, mma)": (v3, 2)}  # (compiled, steps per loop trip)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    rows, record = [], {"env": environment(device="cpu"), "kernels": {}}
    for name, (out, steps) in kernels().items():
        loop = loops(out["sass"])[0]
        total = sum(loop.values()) / steps
        record["kernels"][name] = {"loop_instructions": total, "by_opcode": dict(loop.most_common())}
        top = ", ".join(f"{k} {v / steps:g}" for k, v in loop.most_common(8))
        rows.append([name, total, total / 32, top])
    v1, v3 = (record["kernels"][k]["loop_instructions"] for k in record["kernels"])
    md = "\n".join([
        "# Decode GEMV inner loop in SASS, compiled for sm_90 on the CPU (no GPU)\n",
        f"`{record['env']['command']}`, {record['env']['date']}; triton {triton.__version__}. "
        "14336x4096 NF4+DQ, M = 1, bf16 x, as the dispatch launches each kernel. "
        "One loop step = 16 packed bytes (32 weights) per thread.\n",
        md_table(["kernel", "instructions per step", "per weight", "largest opcodes"], rows),
        f"\nv3 / v1: {v3 / v1:.3f} of the instructions. Predicted time if both stay issue-bound at the same IPC: "
        f"v1's measured 29.0 us x {v3 / v1:.3f} = {29.0 * v3 / v1:.1f} us (read floor ~10 us on an H100).",
    ])  # fmt: skip
    write_results(args.out, "gemv-sass-cpu", record, md)
    print(md)


if __name__ == "__main__":
    main()
