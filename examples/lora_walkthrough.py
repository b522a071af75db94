"""LoRA and QLoRA, number by number: every figure quoted in docs/lora.md is printed by this script.

Run:  python examples/lora_walkthrough.py      (a few seconds on a CPU; nothing is downloaded)

1. why B starts at zero      2. what alpha / r does, and rsLoRA     3. DoRA
4. the Llama-3.1-8B numbers of the notes (r=32, alpha=64 on q,k,v,o), built on the meta device
5. QLoRA: a frozen 4-bit base, float32 adapters, and what merging back into 4 bits costs
"""

from __future__ import annotations

import math

import torch
from torch import nn

import minilora.lora as ml
from minilora.lora import LoRALinear
from minilora.models.config import ModelConfig
from minilora.models.llama import LlamaForCausalLM
from minilora.nn import Linear4bit

LLAMA_31_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def section(title: str) -> None:
    print(f"\n== {title}")


def why_b_starts_at_zero() -> None:
    section("1. B starts at zero")
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(16, 64)
    print(f"output change when the adapter is added: {(layer(x) - base(x)).abs().max().item():.1f}")
    (layer(x) ** 2).sum().backward()
    grad_a = layer.lora_A["default"].weight.grad.abs().max().item()
    grad_b = layer.lora_B["default"].weight.grad.abs().max().item()
    print(f"first step gradients: |dA| max {grad_a:.1f}, |dB| max {grad_b:.3f} (nonzero)")
    # Both zero would be a saddle: each gradient is proportional to the other matrix, so nothing moves.
    both_zero = LoRALinear(nn.Linear(64, 64), r=8, alpha=16)
    with torch.no_grad():
        both_zero.lora_A["default"].weight.zero_()
    (both_zero(x) ** 2).sum().backward()
    stuck = sum(p.grad.abs().max().item() for p in both_zero.adapter_parameters())
    print(f"with A = 0 too: |dA| + |dB| = {stuck:.1f} (training can never start)")


def what_alpha_over_r_does() -> None:
    section("2. scaling = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)")
    r, alpha = 32, 64
    print(f"r={r}, alpha={alpha}: LoRA scaling {alpha / r:.2f}, rsLoRA scaling {alpha / math.sqrt(r):.2f}")
    # One SGD step on B from zero, same input and learning rate, for growing r with alpha fixed.
    # After one step B = -lr * s * g (A x)^T, so the adapter's output on x moves by
    # s B A x = -lr * s^2 * g * ||A x||^2, and ||A x||^2 grows like r: the change goes like s^2 * r,
    # i.e. alpha^2 / r for LoRA (learning slows down as r grows) and alpha^2 for rsLoRA (flat).
    torch.manual_seed(0)
    base = nn.Linear(1024, 1024)
    x, target = torch.randn(1, 1024), torch.randn(1, 1024)
    print("r      output change LoRA   output change rsLoRA   (alpha=16, one SGD step on B, lr=1e-3)")
    for rank in (4, 16, 64, 256):
        changes = []
        for rslora in (False, True):
            torch.manual_seed(1)
            layer = LoRALinear(base, r=rank, alpha=16, use_rslora=rslora)
            ((layer(x) - target) ** 2).mean().backward()
            with torch.no_grad():
                layer.lora_B["default"].weight -= 1e-3 * layer.lora_B["default"].weight.grad
                changes.append(torch.linalg.norm(layer(x) - base(x)).item())
        print(f"{rank:<6} {changes[0]:.2e}             {changes[1]:.2e}")


def dora() -> None:
    section("3. DoRA: a trainable magnitude per output row")
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, alpha=16, use_dora=True)
    m = layer.lora_magnitude_vector["default"]
    x = torch.randn(8, 64)
    row_norm_gap = (m - torch.linalg.norm(base.weight, dim=1)).abs().max().item()
    print(f"m starts as ||W||_row: max gap {row_norm_gap:.1f}")
    print(f"DoRA output change when added: {(layer(x) - base(x)).abs().max().item():.1e}")
    print(f"extra parameters per layer: {m.numel()} (one per output row)")


def llama_31_8b() -> None:
    section("4. Llama-3.1-8B, r=32, alpha=64 on q,k,v,o (meta device: shapes only, no memory)")
    config = ModelConfig.from_dict(LLAMA_31_8B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    _, total = ml.count_parameters(model)
    decoder_linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    )
    rest = total - decoder_linear
    print(f"base params: {total:,} ({decoder_linear:,} in the decoder Linears)")
    print(f"footprint fp32: {4 * total / 1e9:.2f} GB")
    print(f"footprint 8-bit Linears, rest 16-bit: {(decoder_linear + 2 * rest) / 1e9:.2f} GB")
    four_bit = decoder_linear // 2 + 2 * rest
    print(f"footprint 4-bit Linears, rest 16-bit: {four_bit / 1e9:.2f} GB ({four_bit:,} B)")
    h, kv, r = 4096, 1024, 32
    per_layer = (h * r + r * h) + (h * r + r * kv) * 2 + (h * r + r * h)
    print(
        f"LoRA params per layer: q {h * r + r * h:,} + k {h * r + r * kv:,} + v {h * r + r * kv:,} "
        f"+ o {h * r + r * h:,} = {per_layer:,}; x 32 layers = {32 * per_layer:,}"
    )
    ml.add_lora(model, r=32, alpha=64, target_modules=QKVO)
    print(ml.print_trainable_parameters(model))
    nbytes = ml.adapter_nbytes(model)
    print(f"adapter size (float32): {nbytes:,} B = {nbytes / 1e6:.2f} MB")
    print(f"4-bit footprint + fp32 adapter: {(four_bit + nbytes) / 1e9:.2f} GB")
    with torch.device("meta"):
        dora_model = LlamaForCausalLM(config)
    ml.add_lora(dora_model, r=32, alpha=64, target_modules=QKVO, use_dora=True)
    trainable, _ = ml.count_parameters(dora_model)
    print(f"DoRA adds {trainable - 32 * per_layer:,} magnitude params ({trainable:,} trainable)")


def qlora() -> None:
    section("5. QLoRA: frozen NF4 base, float32 adapter")
    torch.manual_seed(0)
    weight = torch.randn(256, 256) * 0.02
    q = Linear4bit.from_weight(weight.to(torch.bfloat16), quant_type="nf4", compress_statistics=True)
    float_twin = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        float_twin.weight.copy_(q.dequantize(torch.float32))
    a, b = LoRALinear(q, r=16, alpha=32), LoRALinear(float_twin, r=16, alpha=32)
    with torch.no_grad():
        a.lora_B["default"].weight.normal_(std=0.01)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(8, 256)
    (a(x) ** 2).sum().backward()
    (b(x) ** 2).sum().backward()
    diff = max(
        (pa.grad - pb.grad).abs().max().item()
        for pa, pb in zip(a.adapter_parameters(), b.adapter_parameters(), strict=True)
    )
    print(f"adapter dtype {a.lora_A['default'].weight.dtype}, base packed {q.weight.dtype} {tuple(q.weight.shape)}")
    print(f"grad(A, B) through NF4 vs through its dequantized float copy: max diff {diff:.1e}")
    stored = q.weight.numel() + q.absmax.numel() * q.absmax.element_size() + 4 * q.nested_absmax.numel()
    print(
        f"NF4 + double quant storage: {8 * stored / weight.numel():.3f} bits/param (vs 16 for bf16), "
        f"+ {q.nbytes_true - stored:,} B of code tables per layer"
    )
    with torch.no_grad():
        a.lora_B["default"].weight.normal_(std=0.01)
    report = a.merge()
    print(
        f"merge into NF4 (dequantize -> add -> requantize): max abs error {report.max_abs_error:.2e}, "
        f"relative {report.rel_error:.3f}"
    )


def main() -> None:
    why_b_starts_at_zero()
    what_alpha_over_r_does()
    dora()
    llama_31_8b()
    qlora()


if __name__ == "__main__":
    main()
