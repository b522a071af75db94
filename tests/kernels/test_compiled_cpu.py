"""The compiled CPU dequantize (minilora/kernels/compiled.py), through the door, against the eager reference and
bitsandbytes, bit for bit.

The size threshold is lowered (compiled.MIN_NUMEL) so that small tensors take the compiled path; one compile per
output dtype serves every shape, blocksize and code, so the file pays three compiles.
"""

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from minilora.kernels import compiled, dequantize_4bit, last_implementation, reference_mode
from minilora.quant import QuantState, get_code, quantize_4bit
from minilora.quant.blockwise import dequantize_absmax

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# bitsandbytes' own pure-PyTorch dequantize (its "default" backend), unwrapped from torch.compile.
bnb_reference_dequantize = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1024)
    monkeypatch.delenv("MINILORA_REFERENCE", raising=False)
    monkeypatch.delenv("MINILORA_CPU_COMPILE", raising=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def compiled_and_reference(packed: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """(compiled path, eager reference), asserting that each path is the one that ran."""
    fast = dequantize_4bit(packed, state)
    assert last_implementation("dequantize_4bit") == "compiled-cpu", "the compiled path did not run"
    with reference_mode():
        ref = dequantize_4bit(packed, state)
    assert last_implementation("dequantize_4bit") == "reference", "the compiled path ran under reference_mode"
    return fast, ref


def bnb_dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch dequantize of minilora's packed codes and state."""
    bnb_state = bnbF.QuantState.from_dict(dict(state.as_dict(packed=True)), device=torch.device("cpu"))
    absmax = bnb_state.absmax
    if bnb_state.nested:
        absmax = bnbF.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    return bnb_reference_dequantize(
        packed.reshape(-1), absmax, bnb_state.code, state.blocksize, bnb_state.shape, state.dtype
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_weights_match_reference_and_bitsandbytes(quant_type, dtype):
    g = torch.Generator().manual_seed(0)
    # (32, 4096): rows of whole blocks; (129, 257): odd numel, a partial last block at every blocksize.
    for shape in [(32, 4096), (129, 257)]:
        # rows from 1e-6 to 10 in scale: float16 outputs reach its subnormals
        scale = 10.0 ** torch.empty(shape[0], 1).uniform_(-6, 1, generator=g)
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        for blocksize in (64, 4096, 128):
            for double_quant in (False, True):
                packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)
                fast, ref = compiled_and_reference(packed, state)
                where = f"{shape} blocksize {blocksize} double_quant {double_quant}"
                assert same_bits(fast, ref), f"compiled != reference, {where}"
                assert same_bits(fast, bnb_dequantize(packed, state)), f"compiled != bitsandbytes, {where}"
                # bitsandbytes' CPU kernel is only right when a row holds whole blocks (docs/quantization.md).
                if shape[-1] % blocksize == 0:
                    bnb_state = bnbF.QuantState.from_dict(dict(state.as_dict(packed=True)), device=torch.device("cpu"))
                    theirs = bnbF.dequantize_4bit(packed, bnb_state).reshape(shape)
                    assert same_bits(fast, theirs), f"compiled != bitsandbytes' CPU kernel, {where}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_ties_and_special_absmax(dtype):
    # Products code * absmax that sit exactly halfway between two bfloat16 / float16 values (codes +-1, +-0.5 hit
    # them), subnormal, overflowing, zero, negative, infinite and NaN absmax; every byte value appears.
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 3 * 2**-9]
    special = [1e-40, 2**-20, 3e-6, 1e38, 7e4, 0.0, -1.0, -(1 + 2**-8), float("inf"), float("nan")]
    absmax = torch.tensor((ties + special) * 3, dtype=torch.float32)
    blocksize = 64
    packed = torch.arange(absmax.numel() * blocksize // 2, dtype=torch.int64).remainder(256).to(torch.uint8)
    for quant_type in ("nf4", "fp4"):
        shape = torch.Size([absmax.numel() * blocksize - 3])  # odd, partial last block
        state = QuantState(absmax, shape, get_code(quant_type), blocksize, quant_type, dtype)
        fast, ref = compiled_and_reference(packed.unsqueeze(1), state)
        assert same_bits(fast, ref), quant_type
        theirs = bnb_reference_dequantize(packed, absmax, state.code, blocksize, shape, dtype)
        finite = ~torch.isnan(theirs)  # NaN payloads may differ from bitsandbytes', not from the reference
        assert same_bits(fast[finite], theirs[finite]) and bool(torch.isnan(fast[~finite]).all()), quant_type

    # Weights on the decision boundaries between codes (ties of the quantizer), as in test_bnb_parity.py.
    for quant_type in ("nf4", "fp4"):
        ordered = get_code(quant_type).sort().values
        midpoints = ((ordered[:-1] + ordered[1:]) * 0.5).to(dtype)
        x = torch.zeros(midpoints.numel() * 2, 64, dtype=dtype)  # (30, 64)
        x[:, 0] = 1.0
        x[:, 1] = midpoints.repeat(2)
        x[:, 2] = -midpoints.repeat(2)
        packed_x, state_x = quantize_4bit(x, 64, quant_type, compress_statistics=True)
        fast, ref = compiled_and_reference(packed_x, state_x)
        assert same_bits(fast, ref) and same_bits(fast, bnb_dequantize(packed_x, state_x)), quant_type


def test_reference_forced_switched_off_or_small_stays_eager(monkeypatch):
    x = torch.randn(64, 64)
    packed, state = quantize_4bit(x, 64, "nf4")

    def ran(dtype: torch.dtype | None = None) -> str | None:
        dequantize_4bit(packed, state, dtype)
        return last_implementation("dequantize_4bit")

    with reference_mode():
        assert ran() == "reference"
    monkeypatch.setenv("MINILORA_REFERENCE", "1")
    assert ran() == "reference"
    monkeypatch.setenv("MINILORA_REFERENCE", "0")
    monkeypatch.setenv("MINILORA_CPU_COMPILE", "0")
    assert ran() == "reference"
    monkeypatch.setenv("MINILORA_CPU_COMPILE", "1")
    monkeypatch.setattr(compiled, "MIN_NUMEL", x.numel() + 1)
    assert ran() == "reference"
    assert ran(torch.float64) == "reference"  # a dtype the kernel does not write
    monkeypatch.setattr(compiled, "MIN_NUMEL", x.numel())
    assert ran() == "compiled-cpu"


def test_kernel_run_eagerly_gives_the_same_bits():
    # Past Dynamo's recompile limit the kernel function would run uncompiled: it must still be exact.
    x = torch.randn(40, 128) * (10.0 ** torch.empty(40, 1).uniform_(-6, 1, generator=torch.Generator().manual_seed(1)))
    for dtype in DTYPES:
        for quant_type in ("nf4", "fp4"):
            packed, state = quantize_4bit(x.to(dtype), 64, quant_type, compress_statistics=True)
            absmax = dequantize_absmax(state)
            eager = compiled._dequantize_blocks(packed.view(-1, 32), absmax, state.code, dtype).reshape(x.shape)
            with reference_mode():
                assert same_bits(eager, dequantize_4bit(packed, state)), (dtype, quant_type)


def test_a_compile_failure_falls_back_to_the_reference_once(monkeypatch, caplog):
    """Inductor failing (here: a C++ compiler that does not exist) is logged once; results stay exact."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(compiled, "_compiled", None)  # a fresh torch.compile wrapper: it must compile again
    monkeypatch.setattr(compiled, "_broken", False)
    torch._dynamo.reset()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    # No cached kernel may stand in. The config's own patch() restores both settings afterwards (a monkeypatch
    # of force_disable_caches, an alias on this module, left it unreadable for later compiles).
    broken_compiler = inductor_config.patch({"force_disable_caches": True, "cpp.cxx": ("/nonexistent/c++",)})
    with broken_compiler, caplog.at_level("WARNING", logger=compiled.__name__):
        got = dequantize_4bit(packed, state)
        again = dequantize_4bit(packed, state)
    assert last_implementation("dequantize_4bit") == "reference" and not compiled.available()
    with reference_mode():
        ref = dequantize_4bit(packed, state)
    assert same_bits(got, ref) and same_bits(again, ref)
    assert sum("compiled CPU dequantize disabled" in r.message for r in caplog.records) == 1
    torch._dynamo.reset()
