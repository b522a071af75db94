"""Dequantizers for ggml's 5-bit legacy types and its k-quants (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).

Written from the block layouts of ggml (ggml-common.h, ``dequantize_row_*`` in ggml-quants.c); each returns
float32 values, one row of ``block_size`` per block, and is tested equal to the ``gguf`` package's
numpy reference (gguf.quants) on random blocks and on the real Gemma-3 270M file.

Legacy 5-bit, 32 values per block:
    Q5_0  22 B = d (f16) | qh (32 high bits) | qs (16 B of low nibbles)     x = (q - 16) * d      5.5 bits
    Q5_1  24 B = d (f16) | m (f16) | qh | qs                                x = q * d + m         6.0 bits
    element j < 16 takes the low nibble of qs[j], element j + 16 its high nibble; bit j of qh is bit 4.

k-quants, 256 values per super-block of 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks:
    Q4_K  144 B = d, dmin (f16) | 12 B of 6-bit (scale, min) pairs | 128 B of nibbles          4.5 bits
              x = (d * scale_s) * q - dmin * min_s, q in 0..15; sub-block s of 32 values.
              Per 64 values, 32 bytes: the low nibbles are sub-block 2i, the high nibbles 2i + 1.
    Q5_K  176 B = Q4_K's header | 32 B qh | 128 B nibbles: q gets bit 4 from qh, bit s of byte l
              for value l of sub-block s                                                     5.5 bits
    Q6_K  210 B = 128 B ql (low 4 bits) | 64 B qh (high 2 bits) | 16 int8 scales | d (f16)
              x = d * scale_s * (q - 32), q in 0..63; 16 sub-blocks of 16 values             6.5625 bits
The 12-byte scale field of Q4_K/Q5_K packs 8 scales and 8 mins of 6 bits: for s < 4 scale = b[s] & 63,
min = b[s + 4] & 63; for s >= 4 the low 4 bits come from b[s + 4] (scale: low nibble, min: high nibble)
and the top 2 bits from b[s - 4] >> 6 (scale) and b[s] >> 6 (min).
"""

from __future__ import annotations

import torch

__all__ = [
    "dequantize_q4_k",
    "dequantize_q5_0",
    "dequantize_q5_1",
    "dequantize_q5_k",
    "dequantize_q6_k",
    "unpack_k_scales",
]

QK_K = 256


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of each block as one float16, widened to float32: (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _bits(qh: torch.Tensor, n_bits: int) -> torch.Tensor:
    """(n, 4) bytes of a little-endian bit field -> (n, n_bits) values 0/1, bit j at column j."""
    j = torch.arange(n_bits)
    return (qh[:, j // 8] >> (j % 8).to(torch.uint8)) & 1


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks (n, 22) uint8 -> (n, 32) float32: x = (q - 16) * d."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 22, f"bad Q5_0 blocks {tuple(blocks.shape)}"
    d = _f16(blocks, 0)  # (n, 1)
    q = _low_high(blocks[:, 6:]) | (_bits(blocks[:, 2:6], 32) << 4)  # (n, 32), 0..31
    return (q.float() - 16.0) * d


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1 blocks (n, 24) uint8 -> (n, 32) float32: x = q * d + m."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 24, f"bad Q5_1 blocks {tuple(blocks.shape)}"
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1) each
    q = _low_high(blocks[:, 8:]) | (_bits(blocks[:, 4:8], 32) << 4)  # (n, 32)
    return q.float() * d + m


def unpack_k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte field of Q4_K / Q5_K (n, 12) -> 6-bit scales and mins, (n, 8) each (uint8)."""
    b = packed
    scales_lo, mins_lo = b[:, 0:4] & 63, b[:, 4:8] & 63  # sub-blocks 0..3
    scales_hi = (b[:, 8:12] & 0x0F) | ((b[:, 0:4] >> 6) << 4)  # sub-blocks 4..7
    mins_hi = (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)
    return torch.cat([scales_lo, scales_hi], dim=1), torch.cat([mins_lo, mins_hi], dim=1)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes per super-block -> (n, 8, 32) 4-bit values: per 32 bytes, low nibbles then high nibbles."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 32)  # (n, 4, 32): 32 bytes for each pair of sub-blocks
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(n, 8, 32)  # (n, sub-block, value)


def _scaled(q: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x = (d * scale_s) * q - dmin * min_s for Q4_K / Q5_K, q (n, 8, 32) -> (n, 256)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    scales, mins = unpack_k_scales(blocks[:, 4:16])  # (n, 8)
    step = (d * scales.float())[..., None]  # (n, 8, 1)
    offset = (dmin * mins.float())[..., None]  # (n, 8, 1)
    return (step * q.float() - offset).reshape(n, QK_K)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks (n, 144) uint8 -> (n, 256) float32."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 144, f"bad Q4_K blocks {tuple(blocks.shape)}"
    return _scaled(_k_nibbles(blocks[:, 16:]), blocks)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K super-blocks (n, 176) uint8 -> (n, 256) float32."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 176, f"bad Q5_K blocks {tuple(blocks.shape)}"
    qh = blocks[:, 16:48]  # (n, 32): byte l holds bit 4 of value l of every sub-block s at bit s
    high = (qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1  # (n, 8, 32)
    return _scaled(_k_nibbles(blocks[:, 48:]) | (high << 4), blocks)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks (n, 210) uint8 -> (n, 256) float32: x = d * scale_s * (q - 32)."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 210, f"bad Q6_K blocks {tuple(blocks.shape)}"
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)  # per half of 128 values: 64 bytes of low 4 bits
    qh = blocks[:, 128:192].reshape(n, 2, 32)  # per half: 32 bytes of high 2 bits
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    d = _f16(blocks, 208)  # (n, 1)
    # Within a half, quarter k (32 values) takes nibble k // 2 of ql[32 * (k % 2) + l] and bits 2k, 2k+1 of qh[l].
    low = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
    high = torch.stack([(qh >> (2 * k)) & 3 for k in range(4)], dim=2)  # (n, 2, 4, 32)
    q = (low | (high << 4)).float() - 32.0  # (n, 2, 4, 32): 8 runs of 32 values
    per_value = scales.reshape(n, 16, 1).expand(n, 16, 16).reshape(n, 2, 4, 32)  # scale s covers 16 values
    return ((d[:, :, None, None] * per_value) * q).reshape(n, QK_K)
