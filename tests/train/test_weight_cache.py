"""cached_dequantize changes speed and memory only: losses, gradients and generations are bit-identical."""

from __future__ import annotations

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
