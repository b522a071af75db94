"""8-bit weights in the style of LLM.int8() (Dettmers et al. 2022), as bitsandbytes stores them.

Bit budget: 8 bits per weight + one float32 scale (SCB) per output row: 8 + 32/in_features bits.

Weights: each output row is scaled by its absmax, SCB[o] = max_i |W[o, i]|, so that it spans
[-127, 127]: CB = round(W * 127 / SCB). (bitsandbytes rounds the weight to float16 first; so do we,
so that the int8 codes are identical.)

Forward (section 3.2 of the paper, "mixed-precision decomposition"): a few feature dimensions of the
activations carry outliers (|x| >= threshold, 6.0 by default in transformers) that row-wise int8
cannot represent. Those input columns run in 16/32-bit against the dequantized weight columns; all
other columns run int8 x int8 with a per-row activation scale:

    y = (Cx @ CB.T) * (SCx x SCB) / 127^2  +  x[:, outliers] @ W_deq[:, outliers].T  +  bias

threshold = 0 disables the decomposition and runs weight-only: y = x @ W_deq.T (activations stay float).
"""

from __future__ import annotations

import torch

from .blockwise import check_float_tensor
from .bnb_cuda_rule import Divide, ieee_divide

# 1 / 127^2 as bitsandbytes writes it (6.200124e-05; the exact value is 6.2000124e-05). Using its constant
# keeps our outputs within float rounding of its outputs, so that activation rounding downstream matches.
INV_127_SQUARED = 6.200124e-05


def quantize_int8_rowwise(weight: torch.Tensor, divide: Divide = ieee_divide) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB float32 [out]) with CB = round(W * divide(127, SCB)) per row.

    divide: IEEE division, as bitsandbytes' CPU path; its CUDA kernel uses __fdividef, the GPU's approximate
    division, which minilora.kernels.quantize_int8 passes on a GPU so that the codes are identical there too.
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 weights must be 2-D [out, in], got shape {tuple(weight.shape)}")
    check_float_tensor(weight, "quantize_int8_rowwise", absmax=torch.zeros(1))
    w16 = weight.detach().to(torch.float16)
    scb = w16.abs().amax(dim=1).float()  # (out,)
    check_float_tensor(weight, "quantize_int8_rowwise", absmax=weight.detach().abs().amax(dim=1))
    safe = torch.where(scb == 0, torch.ones_like(scb), scb)
    scale = divide(127.0, safe)  # (out,)
    cb = torch.round(w16 * scale.unsqueeze(1)).to(torch.int8)  # (out, in)
    return cb, scb


def dequantize_int8_rowwise(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ~= CB * SCB / 127, in float32 (in bitsandbytes' order of operations), cast to dtype."""
    return (cb.float() * scb.float().unsqueeze(1) * (1.0 / 127.0)).to(dtype)


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """x @ W.T for an int8 weight (no bias), computed as LLM.int8() does; result in x.dtype.

    The outlier split uses a 0/1 column mask instead of gathering columns, so shapes never depend on
    the data (the cost: one extra float matmul that is mostly zeros).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (tokens, in)
    if threshold <= 0:
        return (x2 @ dequantize_int8_rowwise(cb, scb, x.dtype).T).reshape(*shape[:-1], cb.shape[0])
    xf = x2.float()
    # LLM.int8 was built for float16 inference: like bitsandbytes, quantize the activations from their
    # float16 rounding (the outlier columns below keep full precision).
    x16 = x2.to(torch.float16).float()
    outlier_entries = x16.abs() >= threshold  # (tokens, in)
    outlier_cols = outlier_entries.any(dim=0)  # (in,)
    # The row scale ignores the outlier entries themselves (as bitsandbytes does); then whole outlier
    # columns leave the int8 product and go to the 16/32-bit one.
    scx = x16.masked_fill(outlier_entries, 0.0).abs().amax(dim=1)  # (tokens,)
    cx = torch.round(x16 * (127.0 / torch.where(scx == 0, torch.ones_like(scx), scx)).unsqueeze(1))
    cx = cx.masked_fill(outlier_cols, 0.0)
    # Integer products summed in float32: exact while in_features * 127^2 < 2^24, else rounded like
    # bitsandbytes' CPU path.
    acc = cx @ cb.float().T  # (tokens, out)
    out = acc * (scx.unsqueeze(1) * scb.unsqueeze(0)) * INV_127_SQUARED
    outliers = xf * outlier_cols  # (tokens, in), zero outside the outlier columns
    out = out + outliers @ dequantize_int8_rowwise(cb, scb, torch.float32).T
    return out.to(x.dtype).reshape(*shape[:-1], cb.shape[0])
