"""Properties of blockwise 4-bit quantization that hold for every input (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.quant import (
    dequantize_4bit,
    dequantize_absmax,
    get_code,
    pack_4bit,
    quantize_4bit,
    quantize_4bit_codes,
    unpack_4bit,
)
from minilora.quant.state import VALID_BLOCKSIZES


def max_half_gap(code: torch.Tensor) -> float:
    ordered = code.sort().values
    return float((ordered[1:] - ordered[:-1]).max()) / 2


# Double quantization stores each absmax with an error of at most nested_absmax x DQ_SCALE_ERROR: the
# largest half-gap of the 8-bit dynamic code, plus half a step of the 65536-point grid that bitsandbytes'
# CPU kernel rounds through, plus float slack.
DQ_SCALE_ERROR = max_half_gap(get_code("dynamic")) + 1.0 / 65535 + 1e-6

tensors = st.builds(
    lambda n, scale, seed: torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale,
    n=st.integers(1, 3000),
    scale=st.sampled_from([1e-4, 0.02, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None)
@given(x=tensors, blocksize=st.sampled_from(VALID_BLOCKSIZES), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_error_bound_without_double_quant(x, blocksize, quant_type):
    packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=False)
    error = (dequantize_4bit(packed, state) - x).abs()
    absmax = state.absmax.repeat_interleave(blocksize)[: x.numel()]
    bound = absmax * max_half_gap(get_code(quant_type)) * (1 + 1e-6)
    assert bool((error <= bound).all()), float((error - bound).max())


@settings(max_examples=60, deadline=None)
@given(x=tensors, blocksize=st.sampled_from(VALID_BLOCKSIZES), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_error_bound_with_double_quant(x, blocksize, quant_type):
    packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=True)
    true_absmax = quantize_4bit(x, blocksize, quant_type, compress_statistics=False)[1].absmax
    nested = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: true_absmax.numel()]
    scale_error = (dequantize_absmax(state) - true_absmax).abs()
    assert bool((scale_error <= nested * DQ_SCALE_ERROR + 1e-7 * true_absmax).all())
    error = (dequantize_4bit(packed, state) - x).abs()
    per_block = true_absmax * max_half_gap(get_code(quant_type)) + nested * DQ_SCALE_ERROR
    bound = (per_block * (1 + 1e-5) + 1e-7 * true_absmax).repeat_interleave(blocksize)[: x.numel()]
    assert bool((error <= bound).all()), float((error - bound).max())


@settings(max_examples=60, deadline=None)
@given(x=tensors, blocksize=st.sampled_from(VALID_BLOCKSIZES), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_quantizing_the_dequantized_tensor_gives_the_same_codes(x, blocksize, quant_type):
    q, absmax = quantize_4bit_codes(x, blocksize, quant_type)
    packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=False)
    q2, absmax2 = quantize_4bit_codes(dequantize_4bit(packed, state), blocksize, quant_type)
    assert torch.equal(absmax, absmax2)
    if quant_type == "fp4":
        # FP4 has two zeros (index 0 and index 8); a dequantized zero comes back as index 0.
        q = torch.where(q == 8, torch.zeros_like(q), q)
    assert torch.equal(q, q2)


@settings(max_examples=100, deadline=None)
@given(indices=st.lists(st.integers(0, 15), min_size=1, max_size=501))
def test_pack_and_unpack_are_inverse(indices):
    q = torch.tensor(indices)
    packed = pack_4bit(q)
    assert packed.shape == ((len(indices) + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(unpack_4bit(packed, len(indices)), q)
    assert int(packed[0, 0]) >> 4 == indices[0]  # the first element sits in the high nibble


@settings(max_examples=40, deadline=None)
@given(x=tensors, exponent=st.integers(-20, 20), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_scaling_by_a_power_of_two_scales_the_dequantized_values_exactly(x, exponent, quant_type):
    c = 2.0**exponent
    a = dequantize_4bit(*quantize_4bit(x, 64, quant_type, compress_statistics=False))
    b = dequantize_4bit(*quantize_4bit(x * c, 64, quant_type, compress_statistics=False))
    assert torch.equal(b, a * c)


@settings(max_examples=40, deadline=None)
@given(x=tensors, c=st.floats(0.01, 100.0), quant_type=st.sampled_from(["nf4", "fp4"]))
def test_scaling_by_any_positive_c_scales_the_dequantized_values(x, c, quant_type):
    packed, state = quantize_4bit(x, 64, quant_type, compress_statistics=False)
    packed_c, state_c = quantize_4bit(x * c, 64, quant_type, compress_statistics=False)
    # Values within float rounding of a decision boundary may round either way; all others agree.
    code = get_code(quant_type).sort().values
    midpoints = (code[1:] + code[:-1]) / 2
    scaled = x / state.absmax.repeat_interleave(64)[: x.numel()].clamp(min=1e-38)
    far = (scaled.unsqueeze(1) - midpoints).abs().amin(dim=1) > 1e-5
    a, b = dequantize_4bit(packed, state), dequantize_4bit(packed_c, state_c)
    torch.testing.assert_close(b[far], a[far] * c, rtol=1e-6, atol=0)


def test_error_is_smaller_for_nf4_than_fp4_on_gaussian_weights():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    err = {
        t: float((dequantize_4bit(*quantize_4bit(x, 64, t, compress_statistics=False)) - x).norm() / x.norm())
        for t in ("nf4", "fp4")
    }
    assert err["nf4"] < err["fp4"]
    assert math.isclose(err["nf4"], 0.095, rel_tol=0.2)  # ~9.5% relative Frobenius error at blocksize 64


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_bits_per_parameter(blocksize):
    x = torch.randn(4096, 512)
    packed, state = quantize_4bit(x, blocksize, "nf4", compress_statistics=True)
    bits = 8 * (packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()) / x.numel()
    expected = 4 + 8 / blocksize + 32 / (blocksize * 256)
    assert abs(bits - expected) < 1e-3
