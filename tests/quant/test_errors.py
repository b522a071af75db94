"""Bad input gets a ValueError that names what is wrong."""

import pytest
import torch

from minilora.nn import Linear4bit, Linear8bit
from minilora.quant import QuantState, quantize_4bit


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(bad):
    x = torch.randn(8, 8)
    x[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*index 29"):
        quantize_4bit(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Linear8bit.from_weight(x)


@pytest.mark.parametrize("blocksize", [0, 16, 63, 100, 8192])
def test_blocksize_bitsandbytes_does_not_allow(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize} is not one of"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.float64])
def test_non_float_tensor(dtype):
    with pytest.raises(ValueError, match=f"dtype {dtype}"):
        quantize_4bit(torch.ones(64, dtype=dtype))


def test_unknown_quant_type_and_empty_tensor():
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.randn(0, 4))


def _state_dict():
    return Linear4bit.from_weight(torch.randn(32, 64), compress_statistics=True).bnb_state_dict("layer.")


@pytest.mark.parametrize(
    "key", ["weight.absmax", "weight.nested_absmax", "weight.quant_map", "weight.nested_quant_map"]
)
def test_state_dict_with_a_missing_key(key):
    tensors = _state_dict()
    del tensors["layer." + key]
    with pytest.raises(ValueError, match=f"layer: missing \\['{key.split('.')[-1]}'\\]"):
        Linear4bit.from_bnb_state_dict(tensors, "layer.")


def test_state_dict_without_the_json_blob():
    tensors = _state_dict()
    del tensors["layer.weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="exactly one 'quant_state.bitsandbytes__nf4\\|fp4'"):
        Linear4bit.from_bnb_state_dict(tensors, "layer.")


def test_state_dict_whose_shape_disagrees_with_its_json():
    tensors = _state_dict()
    tensors["layer.weight"] = tensors["layer.weight"][:-1]
    with pytest.raises(ValueError, match=r"layer: layer.weight is \(1023, 1\).*needs \(1024, 1\) uint8"):
        Linear4bit.from_bnb_state_dict(tensors, "layer.")
    tensors = _state_dict()
    tensors["layer.weight.absmax"] = tensors["layer.weight.absmax"][:5]
    with pytest.raises(ValueError, match=r"absmax is \(5,\).*shape \[32, 64\].*needs \(32,\)"):
        Linear4bit.from_bnb_state_dict(tensors, "layer.")


def test_corrupt_json_blob():
    tensors = _state_dict()
    tensors["layer.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([255, 0, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        QuantState.from_dict({k[len("layer.weight.") :]: v for k, v in tensors.items() if "weight." in k}, "layer")


def test_int8_state_dict_errors():
    tensors = Linear8bit.from_weight(torch.randn(16, 32)).bnb_state_dict("m.")
    bad = dict(tensors)
    del bad["m.SCB"]
    with pytest.raises(ValueError, match=r"m: missing keys \['m.SCB'\]"):
        Linear8bit.from_bnb_state_dict(bad, "m.")
    bad = dict(tensors, **{"m.SCB": torch.ones(15)})
    with pytest.raises(ValueError, match="one scale per row"):
        Linear8bit.from_bnb_state_dict(bad, "m.")
