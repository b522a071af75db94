"""Walk one 8-element block through NF4 quantization, packing, double quantization and back.

    python examples/quantization_walkthrough.py

Every number docs/quantization.md quotes is printed here (tests/quant/test_walkthrough.py checks it).
The library's API only allows bitsandbytes' blocksizes (32..4096); the walk-through calls the same
building blocks with blocksize 8 so that a whole block fits on a line.
"""

from __future__ import annotations

import torch

from minilora.quant import (
    dequantize_blockwise_8bit,
    get_code,
    pack_4bit,
    quantize_4bit,
    quantize_4bit_codes,
    quantize_blockwise_8bit,
    unpack_4bit,
)


def fmt(values: torch.Tensor, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:+.{digits}f}" for v in values.tolist()) + "]"


def main() -> None:
    nf4 = get_code("nf4")
    print("NF4 code (index: value):")
    print("  " + ", ".join(f"{i}: {v:+.4f}" for i, v in enumerate(nf4.tolist())))

    # Four blocks of 8 weights, as a pretrained layer might hold them (roughly N(0, 0.02)).
    w = torch.tensor(
        [
            [0.0125, -0.0310, 0.0042, 0.0267, -0.0088, 0.0000, -0.0194, 0.0371],
            [-0.0150, 0.0020, 0.0440, -0.0062, 0.0105, -0.0290, 0.0008, -0.0121],
            [0.0051, 0.0099, -0.0077, 0.0180, -0.0203, 0.0015, 0.0222, -0.0034],
            [0.0302, -0.0011, 0.0146, -0.0408, 0.0064, 0.0187, -0.0259, 0.0093],
        ]
    )
    block = w[0]
    print("\nStep 1, one block of 8 weights:")
    print("  w       =", fmt(block))
    absmax = block.abs().max()
    print(f"Step 2, absmax = max |w| = {absmax:.4f}  (stored as float32: 32 bits for 8 weights)")
    scaled = block / absmax
    print("Step 3, w / absmax =", fmt(scaled))
    codes, _ = quantize_4bit_codes(block, blocksize=8, quant_type="nf4")
    print("Step 4, nearest NF4 index:", codes.tolist())
    print("        its code value:   ", fmt(nf4[codes.long()]))
    packed = pack_4bit(codes)
    print("Step 5, packed bytes (high nibble = first element):", [f"0x{b:02x}" for b in packed.view(-1).tolist()])
    assert torch.equal(unpack_4bit(packed, 8), codes.long())
    restored = nf4[codes.long()] * absmax
    print("Dequantize, code * absmax =", fmt(restored))
    print("  error                   =", fmt(restored - block))
    ordered = nf4.sort().values
    half_gap = float((ordered[1:] - ordered[:-1]).max()) / 2
    print(
        f"  largest error {float((restored - block).abs().max()):.5f} <= absmax x largest half-gap of NF4 "
        f"({half_gap:.4f}) = {float(absmax) * half_gap:.5f}"
    )

    print("\nDouble quantization of the 4 blocks' absmax:")
    _, absmaxes = quantize_4bit_codes(w.reshape(-1), blocksize=8, quant_type="nf4")
    print("  absmax            =", fmt(absmaxes))
    offset = absmaxes.mean()
    print(f"  offset (mean)     = {offset:+.6f}")
    centred = absmaxes - offset
    print("  absmax - offset   =", fmt(centred, 6))
    dynamic = get_code("dynamic")
    q8, nested = quantize_blockwise_8bit(centred, dynamic, blocksize=256)
    print("  8-bit codes       =", q8.tolist(), f" nested absmax = {float(nested[0]):.6f}")
    back = dequantize_blockwise_8bit(q8, nested, dynamic, 256) + offset
    print("  restored absmax   =", fmt(back, 6))
    print(f"  largest absmax error {float((back - absmaxes).abs().max()):.2e}")
    gaps = dynamic[1:] - dynamic[:-1]
    dq_bound = float(gaps.max()) / 2 + 1 / 65535
    print(f"  bound on the scale error: nested absmax x {dq_bound:.5f}")

    bits_plain = 4 + 32 / 64
    bits_dq = 4 + 8 / 64 + 32 / (64 * 256)
    print(f"\nBits per weight at blocksize 64: {bits_plain:.3f} without, {bits_dq:.3f} with double quantization")

    packed64, state = quantize_4bit(torch.randn(4096, 4096), blocksize=64, quant_type="nf4")
    total = packed64.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
    print(
        f"A 4096x4096 weight: {packed64.numel():,} packed bytes + {state.absmax.numel():,} absmax bytes + "
        f"{4 * state.state2.absmax.numel():,} nested bytes = {8 * total / 4096**2:.3f} bits per weight"
    )


if __name__ == "__main__":
    main()
