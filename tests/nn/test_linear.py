"""Quantized Linear modules: forward, gradients, and equality with bitsandbytes' modules."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from minilora.nn import Linear4bit, Linear8bit, quantized_nbytes, replace_linears


def make_linear(in_features=96, out_features=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_forward_equals_matmul_with_the_dequantized_weight(quant_type, double_quant):
    linear = make_linear()
    q = Linear4bit.from_linear(linear, quant_type=quant_type, compress_statistics=double_quant)
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + linear.bias, rtol=1e-6, atol=1e-6)


def test_4bit_compute_dtype():
    q = Linear4bit.from_linear(make_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    y = q(x)
    assert y.dtype == torch.float32  # returned in the input's dtype
    expected = (x.bfloat16() @ q.dequantize(torch.bfloat16).T + q.bias.bfloat16()).float()
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("module", ["4bit", "8bit"])
def test_input_gradient_equals_the_float_weights_and_weight_gets_none(module):
    linear = make_linear()
    q = Linear4bit.from_linear(linear) if module == "4bit" else Linear8bit.from_linear(linear, threshold=0.0)
    reference = nn.Linear(96, 40)
    reference.weight.data = q.dequantize(torch.float32)
    reference.bias.data = linear.bias.data.clone()
    x = torch.randn(4, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(4, 40)
    q(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert all(not p.requires_grad for p in q.parameters())
    assert all(not b.is_floating_point() or b.numel() < 96 * 40 / 8 for b in q.buffers()), "no float weight kept"
    assert q.weight.grad is None


def test_4bit_backward_keeps_no_float_weight_alive():
    q = Linear4bit.from_linear(make_linear(512, 512))
    x = torch.randn(2, 512, requires_grad=True)
    y = q(x)
    saved = [t for t in y.grad_fn.saved_tensors] if hasattr(y.grad_fn, "saved_tensors") else []
    assert all(t.numel() < 512 * 512 for t in saved)


def test_4bit_state_dict_equals_bitsandbytes_module():
    linear = make_linear()
    ours = Linear4bit.from_linear(linear, quant_type="nf4", compress_statistics=True)
    theirs = bnb.nn.Linear4bit(96, 40, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    theirs.bias = nn.Parameter(linear.bias.data.clone())
    theirs = theirs.to("cpu")
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()  # read before any bnb forward (formats.md 7)
    assert set(sd_ours) == set(sd_theirs)
    for key in sd_theirs:
        assert torch.equal(sd_ours[key], sd_theirs[key]), key


def test_4bit_module_loads_a_bitsandbytes_state_dict_and_back():
    linear = make_linear(256, 40)  # rows of whole blocks: bitsandbytes' CPU dequantize is wrong otherwise
    theirs = bnb.nn.Linear4bit(256, 40, compute_dtype=torch.float32, quant_type="fp4", compress_statistics=False)
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="fp4", blocksize=128)
    theirs = theirs.to("cpu")
    sd = theirs.state_dict()
    ours = Linear4bit.from_bnb_state_dict(sd, "")
    assert ours.quant_type == "fp4" and ours.blocksize == 128
    state = bnbF.QuantState.from_dict(
        {k[7:]: v for k, v in ours.state_dict().items() if k.startswith("weight.")}, "cpu"
    )
    torch.testing.assert_close(ours.dequantize(), bnbF.dequantize_4bit(sd["weight"], state), rtol=0, atol=0)
    # load_state_dict adopts the checkpoint's settings
    fresh = Linear4bit.from_linear(make_linear(256, 40, seed=1))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), ours.dequantize())


def bnb_int8(linear: nn.Linear, threshold: float) -> nn.Module:
    m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=threshold)
    m.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    m.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return m.to("cpu").eval()


def test_int8_codes_equal_bitsandbytes():
    linear = make_linear(128, 64)
    theirs = bnb_int8(linear, 6.0).state_dict()
    ours = Linear8bit.from_linear(linear).state_dict()
    assert set(ours) == set(theirs)
    assert torch.equal(ours["weight"], theirs["weight"]) and torch.equal(ours["SCB"], theirs["SCB"])
    assert int(ours["weight_format"]) == 0
    loaded = Linear8bit.from_bnb_state_dict(theirs, "")
    assert torch.equal(loaded.weight, ours["weight"])


def test_int8_threshold_zero_is_weight_only():
    linear = make_linear(128, 64)
    q = Linear8bit.from_linear(linear, threshold=0.0)
    x = torch.randn(5, 128) * 10
    torch.testing.assert_close(q(x), x @ q.dequantize().T + linear.bias)


@pytest.mark.parametrize("threshold", [6.0, 3.0])
def test_int8_forward_matches_bitsandbytes_with_outliers(threshold):
    linear = make_linear(128, 64)
    x = torch.randn(3, 7, 128) * 0.5
    x[..., 5] = 9.0  # outlier feature dimensions, as in LLM.int8's analysis
    x[0, 2, 77] = -12.0
    ours = Linear8bit.from_linear(linear, threshold=threshold)
    with torch.no_grad():
        y_ours, y_theirs, y_float = ours(x), bnb_int8(linear, threshold)(x).float(), linear(x)
    scale = y_float.abs().max()
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6)
    # the mixed decomposition keeps the outlier columns exact: closer to the float layer than plain int8
    assert (y_ours - y_float).abs().max() / scale < 2e-2


def test_int8_outlier_decomposition_helps():
    linear = make_linear(128, 64)
    x = torch.randn(16, 128) * 0.5
    x[:, 3] = 40.0
    with torch.no_grad():
        exact = linear(x)
        mixed = Linear8bit.from_linear(linear, threshold=6.0)(x)
        no_split = Linear8bit.from_linear(linear, threshold=1e9)(x)  # everything int8
    assert (mixed - exact).abs().max() < (no_split - exact).abs().max() / 4


def test_replace_linears_and_footprint():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(128, 256, bias=False))
    model.add_module("lm_head", nn.Linear(256, 64, bias=False))
    replace_linears(model, lambda name, lin: Linear4bit.from_linear(lin))
    assert isinstance(model.proj, Linear4bit) and isinstance(model.lm_head, nn.Linear)
    counted, true = quantized_nbytes(model)
    assert counted == 128 * 256 // 2 + 256 * 64 * 4
    blocks = 128 * 256 // 64
    assert true == counted + blocks + 16 * 4 + 4 * -(-blocks // 256) + 256 * 4 + 4


def test_load_state_dict_refuses_a_wrong_shape():
    sd = Linear4bit.from_linear(make_linear(256, 40)).state_dict()
    with pytest.raises(RuntimeError, match=r"checkpoint shape \[40, 256\] != module shape \[40, 96\]"):
        Linear4bit.from_linear(make_linear()).load_state_dict(sd)


def test_int8_state_dict_loads_into_bitsandbytes_module():
    linear = make_linear(128, 64)
    ours = Linear8bit.from_linear(linear)
    theirs = bnb_int8(make_linear(128, 64, seed=1), 6.0)  # bitsandbytes loads only into a quantized module
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.weight.data, ours.weight) and torch.equal(theirs.weight.SCB, ours.SCB)
    x = torch.randn(4, 128)
    x[:, 7] = 8.0
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).float(), ours(x), rtol=1e-6, atol=1e-6)
