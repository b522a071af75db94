"""minilora's 4-bit quantizer against bitsandbytes 0.50 on CPU: every byte and every float identical."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.quant import QuantState, dequantize_4bit, get_code, quantize_4bit
from minilora.quant.state import VALID_BLOCKSIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bitsandbytes' own pure-PyTorch dequantize (its "default" backend), unwrapped from torch.compile.
bnb_reference_dequantize = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)


def bnb_absmax(state) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset


def assert_same_as_bnb(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> None:
    ref_packed, ref = bnbF.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(packed, ref_packed), "packed codes differ"
    assert torch.equal(state.absmax, ref.absmax), "absmax differs"
    assert torch.equal(state.code, ref.code)
    assert state.shape == ref.shape and state.dtype == ref.dtype and state.blocksize == ref.blocksize
    if double_quant:
        assert torch.equal(state.offset, ref.offset), "offset differs"
        assert torch.equal(state.state2.absmax, ref.state2.absmax), "nested absmax differs"
        assert torch.equal(state.state2.code, ref.state2.code), "nested code differs"
    else:
        assert state.state2 is None and state.offset is None
    ours = dequantize_4bit(packed, state)
    theirs = bnb_reference_dequantize(ref_packed.reshape(-1), bnb_absmax(ref), ref.code, blocksize, ref.shape, x.dtype)
    assert torch.equal(ours, theirs), "dequantized values differ"
    # bitsandbytes' CPU kernel is only right when a row holds whole blocks (see docs/quantization.md).
    if x.dim() == 2 and x.shape[-1] % blocksize == 0:
        assert torch.equal(ours, bnbF.dequantize_4bit(ref_packed, ref).reshape(ours.shape))


shapes = st.lists(st.integers(1, 70), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 20_000)


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes,
    blocksize=st.sampled_from(VALID_BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    dtype=st.sampled_from(DTYPES),
    double_quant=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 37.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_tensors_match_bitsandbytes(shape, blocksize, quant_type, dtype, double_quant, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    assert_same_as_bnb(x, blocksize, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_the_lower_index(quant_type, dtype):
    code = get_code(quant_type)
    ordered = code.sort().values
    midpoints = ((ordered[:-1] + ordered[1:]) * 0.5).to(dtype)
    # One block per midpoint: [1.0 (sets absmax to 1), midpoint, -midpoint, 0, ...] so scaled == midpoint.
    x = torch.zeros(midpoints.numel(), 64, dtype=dtype)
    x[:, 0] = 1.0
    x[:, 1] = midpoints
    x[:, 2] = -midpoints
    x[:, 3] = midpoints.float().nextafter(torch.tensor(2.0)).to(dtype)
    for double_quant in (False, True):
        assert_same_as_bnb(x, 64, quant_type, double_quant)
    if dtype == torch.float32:
        packed, _ = quantize_4bit(x, 64, quant_type, False)
        q = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(x.shape)
        lower = code.sort(stable=True).indices[:-1]  # code index below each midpoint
        assert torch.equal(q[:, 1].long(), lower)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_blocks_odd_sizes_and_partial_last_block(quant_type):
    x = torch.randn(5, 99)
    x[0] = 0.0  # full zero blocks
    x[-1, -30:] = 0.0  # an all-zero partial last block (495 = 7 * 64 + 47)
    for blocksize in (32, 64, 128):
        for double_quant in (False, True):
            assert_same_as_bnb(x, blocksize, quant_type, double_quant)
    packed, state = quantize_4bit(x, 64, quant_type, False)
    assert packed.shape == ((x.numel() + 1) // 2, 1)
    assert bool((dequantize_4bit(packed, state)[0] == 0).all())


def test_large_weight_with_many_nested_blocks():
    # 600 x 4096 at blocksize 64 -> 38,400 absmax values -> 150 nested blocks.
    x = torch.randn(600, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert_same_as_bnb(x, 64, "nf4", True)


# ---- serialized states travel both ways ----------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_minilora_state_loads_in_bitsandbytes(quant_type, double_quant):
    x = torch.randn(48, 80).to(torch.bfloat16)
    packed, state = quantize_4bit(x, 64, quant_type, double_quant)
    bnb_state = bnbF.QuantState.from_dict(dict(state.as_dict(packed=True)), device=torch.device("cpu"))
    theirs = bnb_reference_dequantize(
        packed.reshape(-1), bnb_absmax(bnb_state), bnb_state.code, 64, bnb_state.shape, x.dtype
    )
    assert torch.equal(dequantize_4bit(packed, state), theirs)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_state_loads_in_minilora(quant_type, double_quant):
    x = torch.randn(48, 128).to(torch.float16)
    packed, ref = bnbF.quantize_4bit(x, blocksize=128, quant_type=quant_type, compress_statistics=double_quant)
    state = QuantState.from_dict(ref.as_dict(packed=True))
    assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, ref))


def test_json_blob_is_byte_identical_to_bitsandbytes():
    x = torch.randn(64, 64)
    packed, ref = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, state = quantize_4bit(x, 64, "nf4", True)
    ours, theirs = state.as_dict(packed=True), ref.as_dict(packed=True)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
