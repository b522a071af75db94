"""LoRALinear on its own: peft's init, the scaling rules, dropout, dtypes, DoRA, merge/unmerge, adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minilora.lora import LoRALinear

peft = pytest.importorskip("peft")


def peft_layer(base: nn.Linear, r: int, lora_alpha: float, **kw) -> nn.Module:
    """peft's own LoRA layer around `base` (the reference)."""
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, **kw)
    return peft.tuners.lora.Linear(base, "default", config=config, r=r, lora_alpha=lora_alpha)


def copy_adapter(src: nn.Module, dst: LoRALinear) -> None:
    with torch.no_grad():
        dst.lora_A["default"].weight.copy_(src.lora_A["default"].weight)
        dst.lora_B["default"].weight.copy_(src.lora_B["default"].weight)
        if "default" in src.lora_magnitude_vector:
            dst.lora_magnitude_vector["default"].copy_(src.lora_magnitude_vector["default"].weight)


def fresh_base(seed: int = 0, in_f: int = 48, out_f: int = 40, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    base.requires_grad_(False)
    return base


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_is_peft_init_draw_for_draw(init: str) -> None:
    """Same seed -> the same A as peft (kaiming-uniform a=sqrt(5), or N(0, 1/r)); B = 0 in both."""
    torch.manual_seed(7)
    theirs = peft_layer(fresh_base(), r=8, lora_alpha=16, init_lora_weights=True if init == "default" else init)
    torch.manual_seed(7)
    ours = LoRALinear(fresh_base(), r=8, alpha=16, init=init)
    torch.testing.assert_close(ours.lora_A["default"].weight, theirs.lora_A["default"].weight, rtol=0, atol=0)
    assert torch.count_nonzero(ours.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on fan_in 48
    if init == "default":
        assert ours.lora_A["default"].weight.abs().max() <= bound


def test_starts_as_the_base_layer_and_scales_by_alpha_over_r() -> None:
    base = fresh_base()
    layer = LoRALinear(base, r=4, alpha=16)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base
    assert layer.settings["default"].scaling == 4.0
    assert LoRALinear(fresh_base(), r=16, alpha=16, use_rslora=True).settings["default"].scaling == 4.0
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), base(x) + 4.0 * x @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_dropout_only_on_the_adapter_branch() -> None:
    base = fresh_base()
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.9).train()
    x = torch.randn(64, 48)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: base output not dropped
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    delta = layer(x) - base(x)
    a_in = delta @ torch.linalg.pinv(layer.lora_B["default"].weight.T)  # recover A(dropout(x))
    assert not torch.allclose(a_in, x @ layer.lora_A["default"].weight.T, atol=1e-3)
    layer.eval()
    torch.testing.assert_close(
        layer(x) - base(x),
        x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_gradients_equal_peft(use_dora: bool, use_rslora: bool) -> None:
    theirs = peft_layer(fresh_base(1), r=6, lora_alpha=12, use_dora=use_dora, use_rslora=use_rslora)
    ours = LoRALinear(fresh_base(1), r=6, alpha=12, use_dora=use_dora, use_rslora=use_rslora)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        theirs.lora_A["default"].weight.normal_()
        if use_dora:
            theirs.lora_magnitude_vector["default"].weight.mul_(1.3)
    copy_adapter(theirs, ours)
    x = torch.randn(4, 7, 48)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    (y_ours**2).sum().backward()
    (y_theirs**2).sum().backward()
    for part in ("lora_A", "lora_B"):
        g_ours = getattr(ours, part)["default"].weight.grad
        torch.testing.assert_close(g_ours, getattr(theirs, part)["default"].weight.grad, rtol=1e-4, atol=1e-4)
    if use_dora:
        torch.testing.assert_close(
            ours.lora_magnitude_vector["default"].grad,
            theirs.lora_magnitude_vector["default"].weight.grad,
            rtol=1e-4,
            atol=1e-4,
        )
    assert ours.base_layer.weight.grad is None


def test_dora_starts_as_the_base_and_trains_the_magnitude() -> None:
    base = fresh_base(2)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], torch.linalg.norm(base.weight, dim=1))
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_16bit_base_keeps_float32_adapters() -> None:
    base = fresh_base(3).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    # peft computes the same: add in float32, then cast back to the base dtype.
    theirs = peft_layer(fresh_base(3).to(torch.bfloat16), r=4, lora_alpha=8)
    theirs.lora_A["default"].float()
    theirs.lora_B["default"].float()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_on_a_float_base(use_dora: bool) -> None:
    base = fresh_base(4)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        if use_dora:
            layer.lora_magnitude_vector["default"].mul_(1.5)
    x = torch.randn(6, 48)
    unmerged = layer(x)
    report = layer.merge()
    assert report.max_abs_error == 0.0 and not report.quantized
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), unmerged, rtol=1e-5, atol=1e-5)


def test_several_named_adapters_one_active() -> None:
    layer = LoRALinear(fresh_base(5), r=4, alpha=4)
    layer.add_adapter("other", r=2, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
        layer.lora_B["other"].weight.fill_(-0.3)
    x = torch.randn(3, 48)
    y_default = layer(x)
    layer.set_adapter("other")
    y_other = layer(x)
    base = layer.base_layer(x)
    expected = base + 4.0 * x @ layer.lora_A["other"].weight.T @ layer.lora_B["other"].weight.T
    torch.testing.assert_close(y_other, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_default, y_other)
    layer.set_adapter("missing-here")  # a layer without the model's active adapter is the base alone
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("other", r=2, alpha=2)


def test_refuses_non_linear_bases() -> None:
    with pytest.raises(ValueError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4), r=2, alpha=2)
    with pytest.raises(ValueError, match="positive int"):
        LoRALinear(fresh_base(), r=0, alpha=2)
