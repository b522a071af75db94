"""FlatLinear4bit (minilora.train.distributed): the packed codes and quant state of a Linear4bit as the bytes
of one float-typed parameter, as FSDP2 shards it; outputs and gradients bit-identical to Linear4bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minilora.nn import Linear4bit
from minilora.train.flat_4bit import FlatLinear4bit, flatten_4bit


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("quant_type", "double_quant", "shape"), [("nf4", True, (48, 40)), ("fp4", False, (33, 17))])
def test_flat_linear4bit_is_bit_identical(storage, quant_type, double_quant, shape) -> None:
    torch.manual_seed(0)
    ref = Linear4bit.from_weight(
        torch.randn(shape), torch.randn(shape[0]), quant_type=quant_type, compress_statistics=double_quant
    )
    flat = FlatLinear4bit(ref, storage)
    assert {n for n, _ in flat.named_parameters()} == {"bias", "quant_data"}
    assert flat.quant_data.dtype == storage and flat.quant_data.dim() == 1 and not flat.quant_data.requires_grad
    assert list(flat.buffers()) == []  # nothing FSDP would leave unsharded
    assert flat.quant_data.numel() * storage.itemsize % 16 == 0
    for name, buf in ref.named_buffers():
        assert torch.equal(getattr(flat, name), buf) and getattr(flat, name).dtype == buf.dtype, name
    assert hasattr(flat, "nested_absmax") == double_quant
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), flat(x2)
    assert torch.equal(y, y_ref)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert torch.equal(x2.grad, x.grad)
    assert torch.equal(flat.dequantize(torch.float32), ref.dequantize(torch.float32))


def test_flatten_4bit_swaps_every_linear4bit_inside_lora(tiny_dir) -> None:
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    model = from_pretrained(tiny_dir, quantize="nf4")
    add_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    before = model(ids)
    n4 = sum(type(m) is Linear4bit for m in model.modules())
    assert flatten_4bit(model, torch.bfloat16) == n4 == 14
    assert not any(type(m) is Linear4bit for m in model.modules())
    assert torch.equal(model(ids), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_flat_piece_at_an_odd_offset_is_copied_to_view() -> None:
    torch.manual_seed(1)
    ref = Linear4bit.from_weight(torch.randn(16, 16))
    flat = FlatLinear4bit(ref, torch.bfloat16)
    # an all-gather may hand back the parameter as a view at an odd element offset: the reads still work
    buf = torch.empty(flat.quant_data.numel() + 1, dtype=torch.bfloat16)
    buf[1:] = flat.quant_data.detach()
    flat.quant_data = nn.Parameter(buf[1:], requires_grad=False)
    assert torch.equal(flat.absmax, ref.absmax) and torch.equal(flat.nested_absmax, ref.nested_absmax)
    assert torch.equal(flat.dequantize(), ref.dequantize())
