"""Quant states that do not fit their codes: a QuantStateError naming what differs, never a partial tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minilora.errors import QuantStateError
from minilora.quant import dequantize_4bit, dequantize_absmax, dequantize_blockwise_8bit, get_code, quantize_4bit


@pytest.mark.parametrize("double", [False, True])
def test_state_of_another_shape(double):
    packed, state = quantize_4bit(torch.randn(64, 64), compress_statistics=double)
    small_packed, small_state = quantize_4bit(torch.randn(32, 64), compress_statistics=double)
    with pytest.raises(QuantStateError, match=r"codes hold 2048 bytes, its shape \[32, 64\] needs 1024"):
        dequantize_4bit(packed, small_state)  # used to return the first half of the weight
    with pytest.raises(QuantStateError, match=r"codes hold 1024 bytes, its shape \[64, 64\] needs 2048"):
        dequantize_4bit(small_packed, state)


@pytest.mark.parametrize("length", [10, 65, 128])
def test_absmax_of_the_wrong_length(length):
    packed, state = quantize_4bit(torch.randn(64, 64), compress_statistics=False)
    absmax = state.absmax.repeat(2)[:length]
    bad = dataclasses.replace(state, absmax=absmax)
    with pytest.raises(QuantStateError, match=rf"absmax has {length} values, .* needs 64"):
        dequantize_4bit(packed, bad)
    with pytest.raises(QuantStateError, match=rf"absmax has {length} values"):
        dequantize_absmax(bad)


def test_nested_state_of_the_wrong_length():
    packed, state = quantize_4bit(torch.randn(512, 64), compress_statistics=True)  # 512 blocks: 2 nested
    state2 = dataclasses.replace(state.state2, absmax=state.state2.absmax[:1])
    with pytest.raises(QuantStateError, match="nested_absmax has 1 values, 2 needed"):
        dequantize_4bit(packed, dataclasses.replace(state, state2=state2))
    with pytest.raises(QuantStateError, match="4 absmax values for 512 codes in blocks of 256; 2 needed"):
        dequantize_blockwise_8bit(state.absmax, torch.ones(4), get_code("dynamic"), 256)


def test_huge_finite_values_give_a_clear_error_not_an_index_error():
    x = torch.full((8, 64), 3e38)
    with pytest.raises(ValueError, match="mean of the block absmax overflows float32.*compress_statistics=False"):
        quantize_4bit(x, compress_statistics=True)
    packed, state = quantize_4bit(x, compress_statistics=False)
    assert torch.equal(dequantize_4bit(packed, state), x)


def test_non_finite_quantize_counts_the_values():
    x = torch.randn(8, 64)
    x[2, :5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(5 of 512 values; first at flat index 128"):
        quantize_4bit(x)
