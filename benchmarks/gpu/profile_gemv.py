"""Run the GEMV decode kernel a few times on gate_proj (14336x4096, NF4 + double quant, M = 1) for Nsight Compute:

    ncu --clock-control none -k regex:_gemv_4bit --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section ... python3 -m benchmarks.gpu.profile_gemv
"""

from __future__ import annotations

import torch

from minilora.kernels.gemv import gemv_4bit
from minilora.quant import quantize_4bit

if __name__ == "__main__":
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, 64, "nf4", True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        gemv_4bit(x, packed, state)
    torch.cuda.synchronize()
