"""GPU tests of the Triton kernels (skipped without CUDA). Run on a CUDA machine with

    pytest -m gpu tests/kernels

- dequantize: bit-identical to minilora.quant.dequantize_4bit for NF4/FP4, with and without double
  quant, every blocksize, odd sizes and partial last blocks, bf16/fp16/fp32 outputs;
- the 4-bit matmul (GEMV for a few rows, the small-M kernel up to 64, else dequantize + cuBLAS): within
  bf16 rounding of the float32 product with the reference weight;
- GEMV decode kernel (M = 1..16): within bf16/fp16 rounding of the float32 product, every blocksize,
  with and without double quant, bf16 and fp16 x, ragged N, strided x;
- Linear4bit: fast path forward and grad_input match the reference path (`reference_mode`), also under
  torch.compile (the custom op traces without graph breaks);
- LoRALinear over Linear4bit at decode: one GEMV with the adapter's term in its epilogue, the reference's
  output within bf16 rounding, and the reference path wherever that kernel does not apply.
"""

from __future__ import annotations

import pytest
import torch

from minilora.kernels import (
    dequantize_4bit,
    implementation,
    last_implementation,
    quantize_4bit,
    reference_mode,
    use_fast_path,
)
from minilora.kernels.platform import _last
from minilora.nn import Linear4bit
from minilora.quant import VALID_BLOCKSIZES

pytestmark = pytest.mark.gpu


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", VALID_BLOCKSIZES)
def test_dequantize_is_bit_identical(quant_type: str, double_quant: bool, blocksize: int) -> None:
    from minilora.kernels.dequant import dequantize_4bit_triton

    gen = torch.Generator(device="cuda").manual_seed(blocksize)
    for shape in [(256, 512), (37, 129), (1, 70001)]:  # whole blocks; partial last block + odd count
        w = torch.randn(shape, device="cuda", generator=gen) * 0.05
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)  # poisoned: every element must be written
            dequantize_4bit_triton(packed, state, dtype, out=out)
            with reference_mode():
                ref = dequantize_4bit(packed, state, dtype)
            assert torch.equal(_bits(out), _bits(ref)), (shape, dtype)
            assert torch.equal(_bits(dequantize_4bit(packed, state, dtype)), _bits(ref))  # dispatches to the kernel
            assert last_implementation("dequantize_4bit") == "triton"
            flat = torch.full((w.numel(),), float("nan"), device="cuda", dtype=dtype)  # out= of another shape
            got = dequantize_4bit(packed, state, out=flat)
            assert got.shape == shape and got.data_ptr() == flat.data_ptr() and torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("m", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("n, k, blocksize", [(512, 1024, 64), (384, 4096, 64), (200, 640, 128), (96, 256, 256)])
def test_matmul_matches_reference(m: int, n: int, k: int, blocksize: int) -> None:
    from minilora.kernels.matmul import matmul_4bit

    torch.manual_seed(m + n)
    w = torch.randn(n, k, device="cuda") * 0.05
    packed, state = quantize_4bit(w, blocksize, "nf4", True)
    w_ref = dequantize_4bit(packed, state, torch.bfloat16).float()
    x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ w_ref.T
    y = matmul_4bit(x, packed, state)
    assert y.shape == (2, m, n) and _rel(y, exact) < 8e-3


def test_unaligned_width_falls_back_and_stays_correct() -> None:
    from minilora.kernels.matmul import matmul_4bit

    w = torch.randn(33, 100, device="cuda")  # 100 % 64 != 0: blocks straddle rows
    packed, state = quantize_4bit(w, 64, "fp4", False)
    x = torch.randn(5, 100, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ dequantize_4bit(packed, state, torch.bfloat16).float().T
    assert _rel(matmul_4bit(x, packed, state), exact) < 8e-3


@pytest.mark.parametrize("m", [1, 40, 100])
def test_linear4bit_fast_path_matches_reference_path(m: int) -> None:
    torch.manual_seed(m)
    layer = Linear4bit.from_weight(torch.randn(768, 512, device="cuda") * 0.05, compute_dtype=torch.bfloat16)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expected = {1: "triton-gemv", 40: "triton-small-m", 100: "triton"}[m]  # <= 4 rows, <= 64 rows, more
    assert use_fast_path(x) and implementation("linear_4bit", x, layer.weight, layer.quant_state) == expected
    y = layer(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    with reference_mode():
        y_ref = layer(x)
        (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert _rel(y, y_ref) < 8e-3
    assert _rel(gx, gx_ref) < 8e-3


@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize(
    "n, k, blocksize, double_quant, quant_type",
    [
        (4096, 4096, 64, True, "nf4"),
        (1000, 1536, 64, False, "fp4"),
        (77, 512, 32, True, "nf4"),
        (300, 2048, 256, True, "nf4"),
    ],
)
def test_gemv_matches_reference(m: int, n: int, k: int, blocksize: int, double_quant: bool, quant_type: str) -> None:
    from minilora.kernels.gemv import gemv_4bit, gemv_supported

    torch.manual_seed(m * 7 + n)
    packed, state = quantize_4bit(torch.randn(n, k, device="cuda") * 0.05, blocksize, quant_type, double_quant)
    w_ref = dequantize_4bit(packed, state, torch.float32)
    for dtype, tol in ((torch.bfloat16, 4e-3), (torch.float16, 1e-3)):
        x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2]  # strided rows: the wrapper copies
        assert gemv_supported(x, state)
        y = gemv_4bit(x, packed, state)
        assert y.shape == (m, n) and y.dtype == dtype
        assert _rel(y, x.float() @ w_ref.T) < tol, (dtype, m)


def test_gemv_is_the_decode_path_and_compiles_through_the_custom_op() -> None:
    from minilora.kernels import matmul

    torch.manual_seed(0)
    layer = Linear4bit.from_weight(torch.randn(512, 256, device="cuda") * 0.05, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert matmul.DECODE_MAX_M >= 1
    y = layer(x)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    y_c = compiled(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_c,) = torch.autograd.grad(y_c, x, g)
    with reference_mode():
        y_ref = layer(x)
    assert _rel(y, y_ref) < 8e-3 and _rel(y_c, y_ref) < 8e-3
    assert _rel(gx_c, gx) < 1e-6


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("r", [32, 12])
def test_lora_on_4bit_at_decode_is_one_gemv_with_the_adapter_in_its_epilogue(m: int, r: int) -> None:
    """LoRALinear over Linear4bit, inference on CUDA, M <= 4 rows: the GEMV kernel adds s * B A x (custom op,
    also compiled); the output is the reference's within bf16 rounding; with autograd on, in training with
    dropout, or above the GEMV's rows, the reference path runs instead."""
    from minilora.lora import LoRALinear

    torch.manual_seed(r)
    base = Linear4bit.from_weight(torch.randn(1024, 512, device="cuda") * 0.05, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=0.1, adapter_dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)  # a trained-looking adapter (B = 0 at init)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with reference_mode():
            expected = layer(x)
        _last.pop("lora_linear_4bit", None)
        got = layer(x)
        assert last_implementation("lora_linear_4bit") == "triton-gemv-lora"
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
        delta = expected - base(x)
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == (m, 1024)
    assert float(delta.float().norm()) > 0.1 * float(expected.float().norm())  # the adapter's term matters
    assert _rel(got, expected) < 8e-3 and _rel(compiled, expected) < 8e-3
    # where it does not apply, forward is the reference
    assert layer._fused_decode(x) is None  # autograd on
    with torch.no_grad():
        assert layer._fused_decode(torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)) is None  # 8 rows
        layer.train()
        assert layer._fused_decode(x) is None  # dropout to draw
        layer.eval()
        assert layer._fused_decode(x.float()) is None  # x not in the compute dtype


@pytest.mark.parametrize("m", [5, 16, 33, 64])
@pytest.mark.parametrize(
    "n, k, blocksize, double_quant, quant_type",
    [(4096, 4096, 64, True, "nf4"), (1000, 1536, 64, False, "fp4"), (80, 512, 32, True, "nf4"),
     (300, 2048, 256, True, "nf4")],
)  # fmt: skip
def test_small_m_kernel_is_the_reference_product(
    m: int, n: int, k: int, blocksize: int, double_quant: bool, quant_type: str
) -> None:
    """The tensor-core small-M kernel: the reference weight (bit for bit, rounded to x's dtype) times x with
    float32 sums, so within float32 summation order of F.linear on the reference-dequantized weight."""
    from minilora.kernels.smallm import matmul_4bit_small_m, small_m_supported

    torch.manual_seed(m * 7 + n)
    packed, state = quantize_4bit(torch.randn(n, k, device="cuda") * 0.05, blocksize, quant_type, double_quant)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2]  # strided rows: the wrapper copies
        assert small_m_supported(x, state)
        expected = x.float() @ dequantize_4bit(packed, state, dtype).float().T
        for cfg in (None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KB": 32, "SPLIT_K": 4, "num_warps": 4}):
            y = matmul_4bit_small_m(x, packed, state, cfg)
            assert y.shape == (m, n) and y.dtype == dtype
            assert _rel(y, expected) < (4e-3 if dtype == torch.bfloat16 else 1e-3), (dtype, cfg)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize(
    "n, k, blocksize, double_quant, quant_type",
    [(4096, 4096, 64, True, "nf4"), (1024, 1536, 64, False, "fp4"), (320, 2048, 256, True, "nf4"),
     (48, 256, 64, True, "fp4")],
)  # fmt: skip
def test_gemv_mma_matches_reference(
    m: int, n: int, k: int, blocksize: int, double_quant: bool, quant_type: str
) -> None:
    """The tensor-core register-decode GEMV (gemv_mma.py): the PTX step on the device, every warp count that
    divides K, against the float32 product with the reference weight, with and without an adapter's term."""
    from minilora.kernels import gemv_mma

    torch.manual_seed(m * 5 + n)
    packed, state = quantize_4bit(torch.randn(n, k, device="cuda") * 0.05, blocksize, quant_type, double_quant)
    w_ref = dequantize_4bit(packed, state, torch.float32)
    for dtype, tol in ((torch.bfloat16, 4e-3), (torch.float16, 1e-3)):
        x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2]
        assert gemv_mma.mma_supported(x, state)
        exact = x.float() @ w_ref.T
        for warps in [w for w in (2, 4, 8, 16) if (k // 64) % w == 0]:  # one warp is refused (gemv_mma.MIN_WARPS)
            y = gemv_mma.gemv_4bit_mma(x, packed, state, warps=warps)
            assert y.shape == (m, n) and y.dtype == dtype
            assert _rel(y, exact) < tol, (dtype, m, warps)
        a, b = torch.randn(12, k, device="cuda", dtype=dtype) * 0.1, torch.randn(n, 12, device="cuda", dtype=dtype)
        h = x @ a.T
        y = gemv_mma.gemv_4bit_mma(x, packed, state, lora=(h, b, 0.5))
        assert _rel(y, exact + 0.5 * h.float() @ b.float().T) < tol, (dtype, m, "lora")


def test_gemv_dispatch_takes_mma_and_falls_back_inside_a_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """With MINILORA_GEMV_MMA=1, matmul_4bit at decode runs the mma kernel once the weight's layout exists; a weight
    first met inside a CUDA graph capture (no layout can be built there) runs gemv.py's kernel; both give the
    product. Without the switch, gemv.py's kernel."""
    from minilora.kernels.matmul import matmul_4bit

    monkeypatch.setenv("MINILORA_GEMV_MMA", "0")
    torch.manual_seed(2)
    p0, s0 = quantize_4bit(torch.randn(256, 512, device="cuda") * 0.05, 64, "nf4", True)
    matmul_4bit(torch.randn(1, 512, device="cuda", dtype=torch.bfloat16), p0, s0)
    assert last_implementation("gemv_4bit") == "fma"
    monkeypatch.setenv("MINILORA_GEMV_MMA", "1")

    torch.manual_seed(1)
    packed, state = quantize_4bit(torch.randn(512, 1024, device="cuda") * 0.05, 64, "nf4", True)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    exact = x.float() @ dequantize_4bit(packed, state, torch.float32).T
    y = matmul_4bit(x, packed, state)
    assert last_implementation("gemv_4bit") == "mma" and _rel(y, exact) < 4e-3
    other, state2 = quantize_4bit(torch.randn(512, 1024, device="cuda") * 0.05, 64, "nf4", True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = matmul_4bit(x, other, state2)
    assert last_implementation("gemv_4bit") == "fma"
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, x.float() @ dequantize_4bit(other, state2, torch.float32).T) < 4e-3
