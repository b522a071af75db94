"""minilora.testing catches three planted bugs, each with a shrunk counterexample, and passes on minilora.

The broken quantizers below write bitsandbytes' NF4 format (packed bytes + QuantState) with one mistake
each and are read back by minilora's (correct) dequantize_4bit, as a user's own quantizer would be:
    off_by_one_level   one decision boundary too few: the top code (1.0) is never chosen
    last_block_absmax  the partial last block takes its absmax over the last `blocksize` elements, which
                       reach back into the previous block
    nibble_order       element 2i goes to the LOW nibble (bitsandbytes puts it in the high one)
"""

from __future__ import annotations

import pytest
import torch

from minilora.quant import QuantState, dequantize_4bit, get_code
from minilora.testing import QuantizerPair, check_all, fourbit_format, minilora_pair

pytest.importorskip("hypothesis")
from minilora.testing.search import cases, find_counterexample  # noqa: E402

BUGS = ("off_by_one_level", "last_block_absmax", "nibble_order")


def broken_quantize(x: torch.Tensor, blocksize: int, bug: str) -> tuple[torch.Tensor, QuantState]:
    code = get_code("nf4")
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if bug == "last_block_absmax" and n % blocksize:
        absmax[-1] = flat[-blocksize:].abs().max()
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    midpoints = (code[1:] + code[:-1]) / 2  # NF4 is sorted: the 15 decision boundaries
    if bug == "off_by_one_level":
        midpoints = midpoints[:-1]
    q = torch.bucketize(scaled, midpoints).to(torch.uint8)  # a tie goes to the lower code
    if n % 2:
        q = torch.cat([q, torch.full((1,), 7, dtype=torch.uint8)])  # pad with the code of 0.0
    high, low = (q[1::2], q[0::2]) if bug == "nibble_order" else (q[0::2], q[1::2])
    packed = ((high << 4) | low).unsqueeze(1)
    state = QuantState(
        absmax=absmax, shape=x.shape, code=code.clone(), blocksize=blocksize, quant_type="nf4", dtype=x.dtype
    )
    return packed, state


def broken_pair(blocksize: int, bug: str) -> QuantizerPair:
    return QuantizerPair(
        name=f"broken nf4 ({bug})",
        quantize=lambda x: broken_quantize(x, blocksize, bug),
        dequantize=lambda q: dequantize_4bit(*q),
        format=fourbit_format("nf4", blocksize),
    )


def test_the_broken_quantizer_is_correct_without_a_bug():
    """The planted bugs are the only difference: without one, the broken quantizer stores minilora's bytes."""
    from minilora.quant import quantize_4bit

    x = torch.randn(3, 333, generator=torch.Generator().manual_seed(0))
    ours, state = broken_quantize(x, 64, bug="none")
    ref, ref_state = quantize_4bit(x, 64, "nf4", compress_statistics=False)
    assert torch.equal(ours, ref) and torch.equal(state.absmax, ref_state.absmax)


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_is_caught_with_a_shrunk_counterexample(bug):
    found = find_counterexample(lambda case: check_all(broken_pair(case[0], bug), case[1]), cases(), max_examples=200)
    assert found is not None, f"{bug} was not caught"
    blocksize, x = found.example
    message = str(found.failure)
    assert f"broken nf4 ({bug})" in message and "block" in message
    n = x.numel()
    if bug == "off_by_one_level":
        # one block suffices: its largest positive value should become code 1.0 and becomes 0.7229
        assert n <= blocksize, found
        assert "block 0" in message
    elif bug == "last_block_absmax":
        # a partial last block is needed, right after one full block
        assert blocksize < n < 2 * blocksize, found
        assert "the partial last block" in message
    else:
        # one element is enough: it lands in the low nibble, which dequantize reads as the second element
        assert n == 1, found
        assert "round-trip error" in message


def test_minilora_passes_where_the_planted_bugs_fail():
    found = find_counterexample(
        lambda case: check_all(minilora_pair("nf4", case[0]), case[1]), cases(), max_examples=200
    )
    assert found is None, str(found)
