"""cached_dequantize changes speed and memory only: losses, gradients and generations are bit-identical."""

from __future__ import annotations

import pytest
import torch

from minilora.train.data import Record, collate, tokenize_records
from minilora.train.loop import causal_lm_loss
from minilora.train.weight_cache import cached_dequantize


def test_cache_gives_bit_identical_loss_grads_and_tokens(tiny_dir, byte_tok):
    from minilora.generate import SamplingConfig, generate
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    model = from_pretrained(tiny_dir, quantize="nf4")
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "down_proj"], init="gaussian")
    batch = collate(tokenize_records([Record("Kettle, $", "25.00"), Record("Sofa $", "600.00")], byte_tok).examples)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss, n = causal_lm_loss(model.train(), batch)
        (loss / n).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_loss, plain_grads = run()
    plain_tokens = generate(model, [256, 80, 114], SamplingConfig(max_new_tokens=8))
    with cached_dequantize(model) as nbytes:
        cached_loss, cached_grads = run()
        cached_tokens = generate(model, [256, 80, 114], SamplingConfig(max_new_tokens=8))
    assert nbytes == 4 * sum(p.numel() for n, p in from_pretrained(tiny_dir).named_parameters() if "_proj" in n)
    assert torch.equal(plain_loss, cached_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, cached_grads, strict=True))
    assert plain_tokens == cached_tokens
    assert not any("cached_weight" in m.__dict__ for m in model.modules())  # restored on exit


def _layer_and_input(device: str, m: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from minilora.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit.from_weight(torch.randn(96, 128, device=device) * 0.05, compute_dtype=torch.bfloat16)
    return layer, torch.randn(m, 128, device=device, dtype=torch.bfloat16, requires_grad=True)


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = layer(x)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    return y, gx


def test_the_cache_serves_forward_and_backward_of_every_4bit_layer() -> None:
    """The cached weight is what the matmul reads (not a patched method some path skips): a cache holding
    another weight changes both the output and the input gradient."""
    from minilora.kernels import last_implementation

    layer, x = _layer_and_input("cpu", 8)
    plain = _forward_backward(layer, x)
    with cached_dequantize(layer) as nbytes:
        assert nbytes == 96 * 128 * 2 and last_implementation("linear_4bit") != "cached"
        cached = _forward_backward(layer, x)
        assert last_implementation("linear_4bit") == "cached"
        layer.cached_weight = torch.zeros_like(layer.cached_weight)
        zero_y, zero_gx = _forward_backward(layer, x)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert not zero_y.any() and not zero_gx.any()
    assert layer.cached_weight is None  # restored on exit


@pytest.mark.gpu
def test_on_cuda_the_cache_replaces_the_triton_path_with_the_same_bits() -> None:
    """On CUDA (M > 64 rows: dequantize kernel + cuBLAS) the cached forward and backward read the cached weight and
    give the uncached bits. (At M <= 64 the uncached path is the GEMV or small-M kernel, which sums in another
    order than cuBLAS: equal within rounding, not bit for bit.)"""
    from minilora.kernels import last_implementation

    layer, x = _layer_and_input("cuda", 128)
    plain = _forward_backward(layer, x)
    assert last_implementation("linear_4bit") == "triton"
    with cached_dequantize(layer):
        cached = _forward_backward(layer, x)
        assert last_implementation("linear_4bit") == "cached"
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
