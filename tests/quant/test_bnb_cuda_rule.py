"""bitsandbytes' CUDA rounding rules (minilora/quant/bnb_cuda_rule.py), checked on the CPU where they are exact.

On the CPU the rule runs with IEEE division; the scales below are powers of two, whose reciprocals every
division gets exactly right, so each expectation is the CUDA kernel's. Byte equality with bitsandbytes' CUDA
kernels is tested on a GPU: tests/kernels/test_gpu_bnb_parity.py.
"""

import numpy as np
import pytest
import torch

from minilora import kernels
from minilora.quant import get_code, quantize_4bit, quantize_4bit_codes
from minilora.quant.blockwise import _pad_index, quantize_blockwise_8bit
from minilora.quant.bnb_cuda_rule import boundaries, code_index_8bit, float32_from_decimal
from minilora.quant.codebooks import sorted_midpoints


def test_decimal_literals_are_read_as_float32_in_one_rounding():
    # NF4's boundary between codes 12 and 13, as a double's shortest repr: the decimal lies just below the
    # midpoint of two float32 values; read through double it rounds to the upper one, read once to the lower.
    text = "0.5016634166240692"
    assert float(np.float32(float(text))) == 0.5016634464263916
    assert float32_from_decimal(text) == 0.5016633868217468
    # exact ties between two float32 values go to the even one
    assert float32_from_decimal("1.000000059604644775390625") == 1.0  # 1 + 2**-24
    assert float32_from_decimal("1.000000178813934326171875") == 1.0 + 2.0**-22  # 1 + 3 * 2**-24
    assert float32_from_decimal("0.0859375") == 0.0859375


def test_nf4_cuda_boundaries_are_the_code_midpoints_up_to_one_float32_step():
    cuda, order = boundaries("nf4")
    cpu = sorted_midpoints(get_code("nf4"))[0].tolist()
    assert order == list(range(16)) and len(cuda) == 15 and cuda == sorted(cuda)
    steps = [abs(a - b) / float(np.spacing(np.float32(b))) for a, b in zip(cuda, cpu, strict=True)]
    assert max(steps) <= 1 and sum(s > 0 for s in steps) >= 1  # at least one boundary moved by a step


def block(values: list[float], blocksize: int = 64) -> torch.Tensor:
    """One block holding `values` then zeros, with absmax 1 (a value 1.0 at the end)."""
    x = torch.zeros(blocksize)
    x[: len(values)] = torch.tensor(values)
    x[-1] = 1.0
    return x


def test_fp4_cuda_rule_takes_the_sign_first():
    x = block([-1e-4, 1e-4, -0.0, 0.0, -0.5, 0.5, 0.0026041700, 0.00260418, -0.583333, -0.5833331])
    cuda, _ = quantize_4bit_codes(x, 64, "fp4", rounding="bnb_cuda")
    cpu, _ = quantize_4bit_codes(x, 64, "fp4", rounding="bnb_cpu")
    code = get_code("fp4")
    got, got_cpu = code[cuda.long()], code[cpu.long()]
    # small magnitudes: -0 (index 8) for negatives, +0 (index 0) for positives and both zeros; the CPU's
    # nearest-code search does the opposite for the nonzero ones
    assert cuda[:4].tolist() == [8, 0, 0, 0] and cpu[:4].tolist() == [0, 8, 0, 0]
    assert got[4] == -0.5 and got[5] == 0.5
    # the boundaries are bitsandbytes' decimals: 0.00260417 (not 1/384), 0.583333 (not 7/12)
    assert got[6] == 0.0 and got[7] == pytest.approx(0.0625 / 12)
    # -0.583333 sits on the CUDA boundary (stays with 0.5); -0.5833331 is past it but below 7/12
    assert got[8] == -0.5 and got[9] == pytest.approx(-2 / 3)
    assert got_cpu[8] == -0.5 and got_cpu[9] == -0.5


def test_nf4_cuda_rule_on_a_moved_boundary_and_an_all_zero_block():
    x = torch.cat([block([0.5016634464263916, 0.5016633868217468]), torch.zeros(64), torch.zeros(10)])
    cuda, absmax_cuda = quantize_4bit_codes(x, 64, "nf4", rounding="bnb_cuda")
    cpu, absmax_cpu = quantize_4bit_codes(x, 64, "nf4", rounding="bnb_cpu")
    assert cuda[:2].tolist() == [13, 12] and cpu[:2].tolist() == [12, 12]
    # all-zero blocks: absmax 0 and index 0 on CUDA (0 * inf is NaN); the CPU stores index 7 (the code 0.0)
    # and floors the partial last block's absmax at 1e-38
    assert absmax_cuda[1:].tolist() == [0.0, 0.0] and cuda[64:].unique().tolist() == [0]
    assert absmax_cpu[1].item() == 0.0 and absmax_cpu[2].item() == pytest.approx(1e-38)
    assert cpu[64:].unique().tolist() == [7]


def test_8bit_cuda_rule_breaks_ties_by_its_binary_search():
    code = get_code("dynamic").float()
    midpoints = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([code, midpoints, torch.rand(10_000) * 2 - 1, torch.tensor([float("nan"), 1.5, -1.5])])
    cuda = code_index_8bit(x, code)
    nearest = torch.bucketize(x, midpoints)
    assert torch.equal(cuda[:256], torch.arange(256))  # every code maps to itself
    assert torch.equal(cuda[256 + 255 : -3], nearest[256 + 255 : -3])  # off the ties: the nearest code
    ties = cuda[256 : 256 + 255] - nearest[256 : 256 + 255]
    assert set(ties.tolist()) == {0, 1} and int(ties.sum()) > 0  # some ties go up
    assert cuda[-3:].tolist() == [0, 255, 0]  # NaN (an all-zero block) -> 0; out of range -> the ends
    q, absmax = quantize_blockwise_8bit(torch.zeros(300), code, 256, rounding="bnb_cuda")
    assert q.unique().tolist() == [0] and absmax.tolist() == [0.0, 0.0]


def test_the_door_picks_the_rule_of_the_device_and_unknown_names_are_refused():
    x = block([-1e-4, 1e-4])  # FP4: the two rules store different zeros for these (see above)
    packed, _ = kernels.quantize_4bit(x, 64, "fp4", compress_statistics=True)
    packed_cpu, _ = quantize_4bit(x, 64, "fp4", compress_statistics=True)  # the reference's default
    packed_cuda, _ = quantize_4bit(x, 64, "fp4", compress_statistics=True, rounding="bnb_cuda")
    assert torch.equal(packed, packed_cpu) and not torch.equal(packed, packed_cuda)  # a CPU tensor: the CPU rule
    with pytest.raises(ValueError, match="rounding"):
        quantize_4bit(x, 64, "nf4", rounding="nearest-ish")
    with pytest.raises(ValueError, match="rounding"):
        quantize_blockwise_8bit(x, get_code("dynamic"), 256, rounding="bnb_gpu")


def test_padding_nibble_of_an_odd_count_is_the_code_of_zero_in_its_block():
    nonzero_end, zero_end = torch.zeros(65), torch.zeros(65)
    nonzero_end[64] = 0.5  # the last (partial) block holds 0.5: the padding value 0 scales to 0
    for quant_type, zero_code in (("nf4", 7), ("fp4", 0)):
        packed, _ = quantize_4bit(nonzero_end, 64, quant_type, compress_statistics=False, rounding="bnb_cuda")
        assert int(packed[-1]) & 15 == zero_code
        packed, state = quantize_4bit(zero_end, 64, quant_type, compress_statistics=False, rounding="bnb_cuda")
        assert int(packed[-1]) & 15 == 0 and state.absmax[-1].item() == 0.0  # 0 * inf: NaN -> index 0
        assert _pad_index(quant_type, "bnb_cpu", state.absmax) == zero_code  # the CPU pads with the code of 0
