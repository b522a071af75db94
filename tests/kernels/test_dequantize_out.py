"""`dequantize_4bit(..., out=)` and the reused buffers of the layers' matmuls (minilora/kernels/workspace.py).

Writing into a given output must give the same bits as a new tensor, on the compiled CPU path (both of its
into-kernels: the int32 pairs for 16-bit outputs, the in-order walk for float32) and on the reference, and
as bitsandbytes' dequantize (whose own `out=` has no CPU kernel in 0.50.2). A layer that dequantizes into a
reused buffer must give the outputs and gradients of one that does not, also with several layers sharing a
buffer and across threads.
"""

import threading

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn.functional as F

from minilora.kernels import compiled, dequantize_4bit, last_implementation, reference_mode, workspace
from minilora.kernels.dispatch import dequantize_for_matmul
from minilora.nn import Linear4bit
from minilora.quant import quantize_4bit

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1024)  # small tensors take the compiled path too
    monkeypatch.delenv("MINILORA_REFERENCE", raising=False)
    monkeypatch.delenv("MINILORA_CPU_COMPILE", raising=False)
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # small layers use the buffers too
    workspace.release()
    yield
    workspace.release()


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(BITS[x.dtype])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_gives_the_same_bits_as_a_new_tensor(quant_type, dtype):
    g = torch.Generator().manual_seed(1)
    # (64, 1024): whole blocks, the compiled into-kernels; (129, 257): a partial last block, which the
    # reference finishes in `out` after the compiled kernel.
    for shape in [(64, 1024), (129, 257)]:
        x = (torch.randn(shape, generator=g) * 0.1).to(dtype)
        for blocksize, double_quant in [(64, True), (128, False)]:
            packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)
            where = f"{shape} blocksize {blocksize} double_quant {double_quant}"
            with reference_mode():
                expected = dequantize_4bit(packed, state)
            for mode in ("compiled", "reference"):
                out = torch.full((x.numel(),), float("nan"), dtype=dtype)  # every element must be written
                if mode == "compiled":
                    got = dequantize_4bit(packed, state, out=out)
                    assert last_implementation("dequantize_4bit") == "compiled-cpu", f"not compiled, {where}"
                else:
                    with reference_mode():
                        got = dequantize_4bit(packed, state, out=out)
                assert got.data_ptr() == out.data_ptr() and got.shape == x.shape, where
                assert torch.equal(bits(got), bits(expected)), f"{mode} into out != new tensor, {where}"
            if shape[-1] % blocksize == 0:  # bitsandbytes' CPU kernel needs rows of whole blocks
                # (bitsandbytes 0.50.2 has no CPU kernel for its own out=: compare with its new tensor)
                bnb_state = bnbF.QuantState.from_dict(dict(state.as_dict(packed=True)), device=torch.device("cpu"))
                theirs = bnbF.dequantize_4bit(packed, bnb_state).reshape(shape)
                assert torch.equal(bits(got), bits(theirs)), f"out != bitsandbytes, {where}"


def test_out_sets_the_dtype_and_the_shape_comes_from_the_weight():
    x = torch.randn(32, 256)
    packed, state = quantize_4bit(x, 64, "nf4")
    out = torch.empty(8, 1024, dtype=torch.bfloat16)  # same element count, another shape
    got = dequantize_4bit(packed, state, out=out)
    assert got.dtype == torch.bfloat16 and got.shape == (32, 256) and got.data_ptr() == out.data_ptr()
    assert torch.equal(bits(got), bits(dequantize_4bit(packed, state, torch.bfloat16)))


@pytest.mark.parametrize(
    "make_out, dtype, message",
    [
        (lambda: torch.empty(32 * 256 - 1), None, "8191 elements"),
        (lambda: torch.empty(32 * 256, dtype=torch.float16), torch.bfloat16, "dtype torch.float16"),
        (lambda: torch.empty(256, 64).t(), None, "not contiguous"),
        (lambda: torch.empty(32 * 256, device="meta"), None, "device meta"),
        (lambda: [0.0] * (32 * 256), None, "expected a tensor"),
    ],
)
def test_bad_out_is_refused(make_out, dtype, message):
    packed, state = quantize_4bit(torch.randn(32, 256), 64, "nf4")
    with pytest.raises(ValueError, match=message):
        dequantize_4bit(packed, state, dtype, out=make_out())


def layer(out_features: int, in_features: int, seed: int, dtype=torch.float32) -> Linear4bit:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    return Linear4bit.from_weight(w.to(dtype), quant_type="nf4", compress_statistics=True, compute_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_sharing_a_buffer_give_the_outputs_and_gradients_of_new_tensors(dtype):
    """Three layers of one shape take turns in one buffer, forward and backward; against plain float weights."""
    layers = [layer(256, 256, seed, dtype) for seed in range(3)]
    x = torch.randn(8, 256, dtype=dtype, requires_grad=True)
    y = layers[2](layers[1](layers[0](x)))
    assert workspace.held_bytes() == 256 * 256 * torch.empty((), dtype=dtype).element_size()
    (y.float() ** 2).sum().backward()

    weights = [m.dequantize() for m in layers]  # new tensors, no buffer involved
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(F.linear(F.linear(x_ref, weights[0]), weights[1]), weights[2])
    (y_ref.float() ** 2).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)


def test_the_buffer_is_reused_across_calls_and_only_for_a_matmul():
    m = layer(256, 512, seed=0)
    first = dequantize_for_matmul(m.weight, m.quant_state, torch.float32)
    second = dequantize_for_matmul(m.weight, m.quant_state, torch.float32)
    assert first.data_ptr() == second.data_ptr()
    assert m.dequantize().data_ptr() != first.data_ptr()  # a plain dequantize is the caller's own tensor
    bf16 = dequantize_for_matmul(m.weight, m.quant_state, torch.bfloat16)
    assert bf16.data_ptr() != first.data_ptr()  # one buffer per dtype
    assert workspace.held_bytes() == 256 * 512 * (4 + 2)
    workspace.release()
    assert workspace.held_bytes() == 0


def test_small_weights_and_other_devices_get_new_tensors(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 256 * 512 * 4)
    small, large = layer(256, 511, seed=0), layer(256, 512, seed=1)
    small(torch.randn(2, 511))
    assert workspace.held_bytes() == 0
    large(torch.randn(2, 512))
    assert workspace.held_bytes() == 256 * 512 * 4
    assert not workspace.applies(torch.device("meta"), 1 << 30)


def test_least_recently_used_buffers_are_dropped(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_BUFFERS", 2)
    a = workspace.scratch(100, torch.float32, torch.device("cpu"))
    workspace.scratch(200, torch.float32, torch.device("cpu"))
    assert workspace.scratch(100, torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    workspace.scratch(300, torch.float32, torch.device("cpu"))  # drops the 200-element one, used least recently
    assert workspace.held_bytes() == (100 + 300) * 4


def test_threads_have_their_own_buffers():
    """Two threads run layers of the same shape at the same time; each gets its own layer's result."""
    layers = [layer(128, 256, seed) for seed in (10, 11)]
    x = torch.randn(4, 256)
    expected = [F.linear(x, m.dequantize()) for m in layers]
    failures = []

    def run(i: int) -> None:
        for _ in range(50):
            if not torch.equal(layers[i](x), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_a_compiled_layer_gives_the_eager_results():
    m = layer(256, 512, seed=3)
    x = torch.randn(4, 512, requires_grad=True)
    eager = m(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad.clone(), None
    compiled_out = torch.compile(m)(x)
    compiled_out.sum().backward()
    assert torch.equal(compiled_out, eager) and torch.equal(x.grad, eager_grad)
