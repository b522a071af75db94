"""The door (minilora/kernels/dispatch.py) on CPU: which implementation a call gets, the switches that force
the reference, and the same bits whichever one ran."""

from __future__ import annotations

import pytest
import torch

from minilora import kernels
from minilora.kernels import compiled, dispatch
from minilora.nn import Linear4bit
from minilora.quant import quantize_4bit

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(autouse=True)
def _clean_switches(monkeypatch: pytest.MonkeyPatch):
    for name in ("MINILORA_REFERENCE", "MINILORA_CPU_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "_forced", None)


def _large() -> tuple[torch.Tensor, object]:
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 131,072 >= MIN_NUMEL
    return quantize_4bit(w, 64, "nf4", compress_statistics=True)


def test_a_large_cpu_dequantize_is_compiled_and_every_switch_forces_the_reference(monkeypatch) -> None:
    if not compiled.available():
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    packed, state = _large()
    assert kernels.implementation("dequantize_4bit", packed, state, torch.bfloat16) == "compiled-cpu"
    fast = kernels.dequantize_4bit(packed, state, torch.bfloat16)
    assert kernels.last_implementation("dequantize_4bit") == "compiled-cpu"

    with kernels.reference_mode():
        assert kernels.implementation("dequantize_4bit", packed, state, torch.bfloat16) == "reference"
        in_mode = kernels.dequantize_4bit(packed, state, torch.bfloat16)
        assert kernels.last_implementation("dequantize_4bit") == "reference"
    monkeypatch.setenv("MINILORA_REFERENCE", "1")
    assert kernels.implementation("dequantize_4bit", packed, state, torch.bfloat16) == "reference"
    by_env = kernels.dequantize_4bit(packed, state, torch.bfloat16)
    assert kernels.last_implementation("dequantize_4bit") == "reference"

    for other in (in_mode, by_env):
        assert torch.equal(fast.view(BITS[fast.dtype]), other.view(BITS[other.dtype]))


def test_small_weights_other_dtypes_and_cpu_quantizers_take_the_reference() -> None:
    w = torch.randn(16, 64)
    packed, state = quantize_4bit(w, 64, "nf4")
    assert kernels.implementation("dequantize_4bit", packed, state) == "reference"  # below compiled.MIN_NUMEL
    assert kernels.implementation("dequantize_4bit", packed, state, torch.float64) == "reference"
    assert kernels.implementation("quantize_4bit", w) == "reference"
    assert kernels.implementation("quantize_4bit", w, rounding="bnb_cuda") == "reference"  # no GPU: PyTorch's rule
    assert kernels.implementation("quantize_int8", w) == "reference"
    door_packed, door_state = kernels.quantize_4bit(w, 64, "nf4")
    assert torch.equal(door_packed, packed) and torch.equal(door_state.absmax, state.absmax)
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        kernels.implementation("matmul", w)


def test_a_linear_reports_what_served_its_matmul() -> None:
    layer = Linear4bit.from_weight(torch.randn(32, 64), blocksize=64)
    x = torch.randn(3, 64)
    assert kernels.implementation("linear_4bit", x, layer.weight, layer.quant_state) == "reference"
    y = layer(x)
    assert kernels.last_implementation("linear_4bit") == "reference"
    layer.cached_weight = layer.dequantize()
    assert torch.equal(layer(x), y) and kernels.last_implementation("linear_4bit") == "cached"
