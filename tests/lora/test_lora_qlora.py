"""QLoRA: adapters over minilora's 4-bit and 8-bit bases (gradients, merges, unload, peft + bitsandbytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import minilora.lora as ml
from minilora.lora import LoRALinear
from tests.lora.lora_testutil import (
    ATTN,
    assert_logits_close,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)

# Half the widest gap between neighbouring code values: the worst rounding error, in units of the block absmax.
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # between -1.0 and -0.696 (formats.md, section 1)
FP4_HALF_GAP = (12 - 8) / 12 / 2  # between 8/12 and 12/12


def quantized_base(kind: str, seed: int = 0, out_f: int = 96, in_f: int = 128) -> nn.Module:
    from minilora.nn import Linear4bit, Linear8bit

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    bias = torch.randn(out_f, generator=gen) * 0.01
    if kind == "int8":
        return Linear8bit.from_weight(weight, bias, threshold=0.0)
    return Linear4bit.from_weight(weight, bias, quant_type=kind, compress_statistics=True)


def float_twin(base: nn.Module) -> nn.Linear:
    """The same function as `base`, as a float nn.Linear holding the dequantized weight."""
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(base.dequantize())
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def pair(kind: str, use_dora: bool = False) -> tuple[LoRALinear, LoRALinear]:
    base = quantized_base(kind)
    twin = float_twin(base)
    q = LoRALinear(base, r=8, alpha=16, use_dora=use_dora)
    f = LoRALinear(twin, r=8, alpha=16, use_dora=use_dora)
    with torch.no_grad():
        q.lora_B["default"].weight.normal_(std=0.05)
        if use_dora:
            q.lora_magnitude_vector["default"].mul_(1.2)
        f.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    return q, f


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_gradients_through_4bit_equal_dequantized_float(kind: str, use_dora: bool) -> None:
    q, f = pair(kind, use_dora)
    x = torch.randn(3, 5, 128)
    xq, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yq, yf = q(xq), f(xf)
    torch.testing.assert_close(yq, yf, rtol=1e-5, atol=1e-6)
    (yq**2).sum().backward()
    (yf**2).sum().backward()
    names = ["lora_A.default.weight", "lora_B.default.weight"] + (["lora_magnitude_vector.default"] if use_dora else [])
    gq, gf = dict(q.named_parameters()), dict(f.named_parameters())
    for name in names:
        assert gq[name].grad is not None and gq[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(gq[name].grad, gf[name].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xq.grad, xf.grad, rtol=1e-5, atol=1e-6)
    # The quantized base holds buffers (no gradient possible) and a frozen bias.
    assert not any(p.requires_grad for p in q.base_layer.parameters())
    assert q.base_layer.bias.grad is None


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merge_into_quantized_base_reports_requantization_error(kind: str) -> None:
    q, f = pair(kind)
    original = q.base_layer
    x = torch.randn(4, 128)
    unmerged = q(x)
    target = f.to_linear().weight.detach()  # W_deq + s B A in float32
    report = q.merge(module_name="layer")
    assert report.quantized and report.module == "layer"
    requant = q.base_layer.dequantize().float()
    assert type(q.base_layer) is type(original)
    assert report.max_abs_error == pytest.approx((requant - target).abs().max().item(), rel=1e-6)
    assert report.rel_error == pytest.approx((torch.linalg.norm(requant - target) / torch.linalg.norm(target)).item())
    if kind == "int8":
        # Half an int8 step per row, plus the float16 rounding of W * 127 / SCB (LLM.int8 quantizes in
        # 16-bit): at most 1/16 of a step for the input rounding and 1/32 for the product.
        bound = target.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 1 / 16 + 1 / 32)
    else:
        from minilora.quant import dequantize_absmax

        # |error| <= half_gap * absmax + |scale - absmax|: rounding, plus what double quantization did
        # to the block's scale (values beyond a too-small scale are clamped).
        absmax = target.flatten().view(-1, 64).abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
        scale = dequantize_absmax(q.base_layer.quant_state).view(-1, 1)  # (n_blocks, 1)
        half_gap = NF4_HALF_GAP if kind == "nf4" else FP4_HALF_GAP
        bound = (half_gap * absmax + (scale - absmax).abs()).expand(-1, 64).reshape(target.shape)
        assert report.max_abs_error > 0
    assert ((requant - target).abs() <= bound + 1e-7).all()
    # The merged layer is the requantized base alone, close to the unmerged output.
    torch.testing.assert_close(q(x), q.base_layer(x), rtol=0, atol=0)
    assert (q(x) - unmerged).abs().max() <= (bound.max() * x.abs().sum(dim=1).max()).item()
    q.unmerge()
    assert q.base_layer is original
    torch.testing.assert_close(q(x), unmerged, rtol=0, atol=0)


def test_merge_and_unload_dequantizes(tiny_llama_dir: Path) -> None:
    model = ml.add_lora(minilora_model(tiny_llama_dir, quantize="nf4"), r=8, alpha=16, target_modules="all-linear")
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        before = logits(model, input_ids())
    merged = ml.merge_and_unload(model)
    assert not ml.lora_layers(merged)
    assert all(type(m) is not LoRALinear and not hasattr(m, "quant_type") for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert_logits_close(logits(merged, input_ids()), before, rel=1e-5)


def test_nf4_adapter_parity_with_bitsandbytes_and_peft(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """minilora NF4 + adapter <-> transformers/bitsandbytes NF4 + peft, both directions, same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")

    def bnb_model() -> nn.Module:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        return transformers.LlamaForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=config, dtype=torch.float32
        )

    # bitsandbytes on a CPU with AVX512-BF16 repacks the weight and computes in bfloat16 in eval mode
    # (formats.md section 7); in train mode it dequantizes and runs a float32 matmul, the same function as
    # minilora's. Every dropout here is 0, so train mode is deterministic.
    ours = ml.add_lora(minilora_model(tiny_llama_dir, quantize="nf4"), r=8, alpha=16, target_modules=ATTN)
    randomize_adapters(ours, seed=4)
    with torch.no_grad():
        ours_logits = logits(ours, input_ids())
    ml.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bnb_model(), tmp_path / "ours").train()
    with torch.no_grad():
        assert_logits_close(logits(theirs, input_ids()), ours_logits, rel=1e-5)

    peft_model = peft.get_peft_model(
        bnb_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    ).train()
    randomize_adapters(peft_model, seed=6)
    with torch.no_grad():
        ref = logits(peft_model, input_ids())
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = ml.load_adapter(minilora_model(tiny_llama_dir, quantize="nf4"), tmp_path / "peft")
    with torch.no_grad():
        assert_logits_close(logits(loaded, input_ids()), ref, rel=1e-5)
    assert ml.print_trainable_parameters(loaded).split(" || ")[1] == (
        f"all params: {peft_model.get_nb_trainable_parameters()[1]:,d}"
    )
