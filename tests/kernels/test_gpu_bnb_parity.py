"""minilora's quantizers on a CUDA tensor against bitsandbytes' CUDA kernels, byte for byte (skipped without CUDA).

On CUDA, the door (minilora.kernels) follows bitsandbytes' CUDA rounding (minilora/quant/bnb_cuda_rule.py;
kernels/quantize.py, kernels/fastdiv.py): the packed 4-bit codes, absmax, double-quant codes, nested absmax and offset,
and the int8 codes and SCB must equal what bitsandbytes stores for the same tensor on the same device.

    pytest -m gpu tests/kernels
"""

from __future__ import annotations

import pytest
import torch

from minilora.kernels import implementation, quantize_4bit
from minilora.kernels import quantize_int8 as quantize_int8_rowwise
from minilora.quant import VALID_BLOCKSIZES, pack_4bit
from minilora.quant.blockwise import _pad_index

pytestmark = pytest.mark.gpu
bnbF = pytest.importorskip("bitsandbytes.functional")


def weights(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian weights (std 0.02) with awkward blocks in front: zeros, tiny (normal, ~1e-30) values, and coarse
    multiples of a power of two, whose ratios to the block's absmax land exactly on decision boundaries; the
    last 3 values are zeros (with an odd count, an all-zero partial block whose padding nibble is stored too).
    Subnormal inputs, which both sides flush to zero, are not among them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda") * 0.02
    flat = x.view(-1)
    flat[:128] = 0.0
    flat[128:192] = torch.randn(64, generator=g, device="cuda") * 1e-30
    end = min(4288, flat.numel() - 3)
    flat[192:end] = torch.randint(-64, 65, (end - 192,), generator=g, device="cuda").float() / 1024
    flat[-3:] = 0.0
    return x.to(dtype)


def differing(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (a != b).nonzero().view(-1)
    return f"{d.numel()} of {a.numel()} differ, first at {d[:5].tolist()}: {a[d[:5]].tolist()} vs {b[d[:5]].tolist()}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_bytes_equal_bitsandbytes_cuda(quant_type: str, dtype: torch.dtype) -> None:
    # the second and third: odd sizes, partial last blocks; the third's last block holds only its 3 zeros
    for seed, shape in enumerate([(1024, 1024), (333, 777), (1, 64 * 5 + 3)]):
        x = weights(shape, dtype, seed)
        for blocksize in [b for b in VALID_BLOCKSIZES if b >= 64]:  # bitsandbytes' CUDA kernel: 64 .. 4096
            for double_quant in (False, True):
                where = f"{shape} blocksize {blocksize} double_quant {double_quant}"
                packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)
                theirs, their_state = bnbF.quantize_4bit(
                    x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
                )
                assert torch.equal(packed.view(-1), theirs.view(-1)), f"codes, {where}: {differing(packed, theirs)}"
                assert torch.equal(state.absmax, their_state.absmax), f"absmax, {where}"
                if double_quant:
                    assert torch.equal(state.state2.absmax, their_state.state2.absmax), f"nested absmax, {where}"
                    assert torch.equal(state.offset.reshape(-1), their_state.offset.reshape(-1)), f"offset, {where}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_bytes_equal_bitsandbytes_cuda_on_a_large_weight(quant_type: str) -> None:
    # 16.8M values: enough boundary cases that an IEEE division instead of bitsandbytes' approximate one
    # changes hundreds of FP4 codes in bfloat16 (found by benchmarks/gpu/rounding_probe.py, a one-off probe
    # since removed; in git history).
    for dtype in (torch.bfloat16, torch.float32):
        x = weights((4096, 4096), dtype, seed=7)
        packed, state = quantize_4bit(x, 64, quant_type, compress_statistics=True)
        theirs, their_state = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed.view(-1), theirs.view(-1)), f"{dtype}: {differing(packed, theirs)}"
        assert torch.equal(state.absmax, their_state.absmax), dtype
        assert torch.equal(state.state2.absmax, their_state.state2.absmax), dtype


@pytest.mark.parametrize("shape", [(4096, 4096), (333, 777)])
def test_int8_codes_and_scales_equal_bitsandbytes_cuda(shape: tuple[int, int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(11)
    w = torch.randn(shape, generator=g, device="cuda") * 0.5
    w[3] = 0.0  # a zero row
    w[5, :64] = torch.randint(-64, 65, (64,), generator=g, device="cuda").float() / 64  # exact ratios
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cb, scb = quantize_int8_rowwise(w.to(dtype))
        # bitsandbytes' CUDA kernel takes float16 (Int8Params casts the weight to it before quantizing).
        their_cb, their_scb, _ = bnbF.int8_vectorwise_quant(w.to(dtype).half(), threshold=0.0)
        assert torch.equal(cb, their_cb), f"{dtype}: {differing(cb, their_cb)}"
        assert torch.equal(scb, their_scb.float()), dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_quantize_equals_the_pytorch_rule(quant_type: str) -> None:
    """quantize_4bit on CUDA runs kernels/quantize.py; bnb_cuda_rule runs the same rule in PyTorch ops, given the
    same fast-math division (its IEEE default differs from bitsandbytes' on rare boundary values, FP4 mostly)."""
    from minilora.kernels.fastdiv import approx_divide
    from minilora.quant import bnb_cuda_rule

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for blocksize in VALID_BLOCKSIZES:  # 32 too, which bitsandbytes' CUDA kernel lacks
            for seed, shape in enumerate([(256, 512), (37, 129), (1, 64 * 5 + 3)]):
                x = weights(shape, dtype, seed)
                assert implementation("quantize_4bit", x) == "triton"
                packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=False)
                absmax, scaled = bnb_cuda_rule.scale_blocks(x.reshape(-1), blocksize, divide=approx_divide)
                q = bnb_cuda_rule.code_index(scaled, quant_type)
                expected = pack_4bit(q, pad_index=_pad_index(quant_type, "bnb_cuda", absmax))
                where = f"{dtype} blocksize {blocksize} shape {shape}"
                assert torch.equal(packed, expected), f"{where}: {differing(packed, expected)}"
                assert torch.equal(state.absmax, absmax), where


def test_triton_8bit_codes_equal_the_pytorch_rule() -> None:
    from minilora.kernels.fastdiv import approx_divide
    from minilora.kernels.quantize import quantize_8bit_triton
    from minilora.quant import bnb_cuda_rule, get_code

    code = get_code("dynamic").cuda()
    g = torch.Generator(device="cuda").manual_seed(3)
    midpoints = (code[:-1] + code[1:]) * 0.5  # 255 values
    x = torch.cat(
        [
            torch.randn(391 * 256, generator=g, device="cuda"),  # whole blocks
            torch.zeros(256, device="cuda"),  # an all-zero block
            torch.cat([midpoints, torch.ones(1, device="cuda")]),  # absmax 1: every midpoint is an exact tie
            code,  # absmax 1: every code maps to itself
        ]
    )
    q, absmax = quantize_8bit_triton(x, code, 256)
    ref_absmax, scaled = bnb_cuda_rule.scale_blocks(x, 256, divide=approx_divide)
    ref = bnb_cuda_rule.code_index_8bit(scaled, code.float()).to(torch.uint8)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(q, ref), differing(q, ref)


def test_nan_and_inf_are_refused_on_the_gpu_path() -> None:
    for bad in (float("nan"), float("inf")):
        x = torch.randn(64, 128, device="cuda")
        x[5, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_4bit(x, 64, "nf4")
