"""The compiled CPU decode GEMV (minilora/kernels/compiled.py: gemv_4bit), through the door (linear_4bit).

A GEMV sums in another order than dequantize + F.linear, so it is not bit-exact: each output is held to the
float32 bound of a K-term dot product, |y - ref| <= K * 2**-24 * sum_k |w_k x_k| (Higham's gamma_K), with the
output's own rounding added for 16-bit x. The threshold is lowered (compiled.MIN_NUMEL) so small weights take it.
"""

import pytest
import torch
import torch.nn.functional as F

from minilora.kernels import compiled, implementation, last_implementation, linear_4bit, reference_mode
from minilora.quant import quantize_4bit
from minilora.quant.blockwise import dequantize_4bit as reference_dequantize

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1024)
    monkeypatch.delenv("MINILORA_REFERENCE", raising=False)
    monkeypatch.delenv("MINILORA_CPU_COMPILE", raising=False)


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (10.0 ** torch.empty(n, 1).uniform_(-3, 1, generator=g))


def assert_within_dot_product_bound(y: torch.Tensor, x: torch.Tensor, w32: torch.Tensor) -> None:
    """y (x's dtype) against the float32 product of x and the exact dequantized weight w32 (N, K)."""
    x32 = x.to(torch.float32).reshape(1, -1)
    ref = F.linear(x32, w32).reshape(-1)
    magnitude = F.linear(x32.abs(), w32.abs()).reshape(-1)  # sum_k |w_k x_k|
    k = w32.shape[1]
    bound = 2 * k * 2.0**-24 * magnitude + UNIT_ROUNDOFF[x.dtype] * ref.abs()
    err = (y.to(torch.float32).reshape(-1) - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e} for {x.dtype}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_row_reads_the_bytes_within_a_dot_products_rounding(quant_type, double_quant, dtype):
    w = weight(96, 256)
    packed, state = quantize_4bit(w.to(dtype), 64, quant_type, compress_statistics=double_quant)
    w32 = reference_dequantize(packed, state, torch.float32)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        assert implementation("linear_4bit", x, packed, state) == "compiled-cpu-gemv"
        y = linear_4bit(x, packed, state)
    assert last_implementation("linear_4bit") == "compiled-cpu-gemv"
    assert y.shape == (1, 1, 96) and y.dtype == dtype
    assert_within_dot_product_bound(y, x, w32)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_every_block_size_and_shape_is_served(blocksize):
    # several shapes and block sizes in one process: the compiled kernel's static block size and dynamic sizes
    for n, k in ((64, 512), (160, 256), (33, 768)):
        packed, state = quantize_4bit(weight(n, k, seed=n), blocksize, "nf4")
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            y = linear_4bit(x, packed, state)
        assert last_implementation("linear_4bit") == "compiled-cpu-gemv", (n, k, blocksize)
        assert_within_dot_product_bound(y, x, reference_dequantize(packed, state, torch.float32))


def test_the_gemv_is_not_taken_where_it_does_not_apply(monkeypatch):
    packed, state = quantize_4bit(weight(64, 256), 64, "nf4")
    one_row = torch.randn(1, 256)

    def ran(x: torch.Tensor) -> str | None:
        with torch.no_grad():
            linear_4bit(x, packed, state)
        return last_implementation("linear_4bit")

    assert ran(one_row) == "compiled-cpu-gemv"
    assert ran(torch.randn(2, 256)) == "compiled-cpu"  # two rows: dequantize + F.linear
    trained = one_row.clone().requires_grad_()
    linear_4bit(trained, packed, state).sum().backward()  # a gradient to carry: the differentiable path
    assert last_implementation("linear_4bit") == "compiled-cpu" and trained.grad is not None
    with reference_mode():
        assert ran(one_row) == "reference"
    monkeypatch.setenv("MINILORA_CPU_COMPILE", "0")
    assert ran(one_row) == "reference"
    monkeypatch.delenv("MINILORA_CPU_COMPILE")
    ragged_packed, ragged_state = quantize_4bit(weight(64, 96), 64, "nf4")  # rows of 1.5 blocks
    with torch.no_grad():
        linear_4bit(torch.randn(1, 96), ragged_packed, ragged_state)
    assert last_implementation("linear_4bit") == "compiled-cpu"


def test_a_failing_compile_falls_back_to_dequantize_and_linear(monkeypatch):
    def broken(*args):  # noqa: ANN002
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled, "_gemv", broken)
    monkeypatch.setattr(compiled, "_broken", False)
    packed, state = quantize_4bit(weight(64, 256), 64, "nf4")
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = linear_4bit(x, packed, state)
    assert last_implementation("linear_4bit") == "reference" and not compiled.available()
    with reference_mode(), torch.no_grad():
        assert torch.equal(y, linear_4bit(x, packed, state))
