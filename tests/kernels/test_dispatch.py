"""Dispatch of the fast path (CPU-runnable): the reference runs on CPU, the switch forces it everywhere,
and the Triton kernels compute the reference's function (checked in Triton's CPU interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minilora.kernels as kernels
from minilora.kernels import dispatch
from minilora.nn import Linear4bit
from minilora.quant import dequantize_4bit, quantize_4bit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_switch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MINILORA_REFERENCE", raising=False)
    saved = dispatch._forced
    dispatch._forced = None
    yield
    dispatch._forced = saved


def test_cpu_tensor_takes_the_reference() -> None:
    assert not kernels.use_fast_path(torch.zeros(2))


def test_cuda_tensor_takes_the_fast_path_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCuda:
        is_cuda = True

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]
    kernels.use_reference(True)
    assert not kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]
    kernels.use_reference(False)
    assert kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]
    with kernels.reference_mode():
        assert not kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]
    assert kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert not kernels.use_fast_path(FakeCuda())  # type: ignore[arg-type]


@pytest.mark.parametrize("value, forced", [("1", True), ("true", True), ("0", False), ("", False)])
def test_environment_variable_forces_the_reference(monkeypatch: pytest.MonkeyPatch, value: str, forced: bool) -> None:
    monkeypatch.setenv("MINILORA_REFERENCE", value)
    assert kernels.reference_forced() is forced
    kernels.use_reference(False)  # an explicit call overrides the environment
    assert not kernels.reference_forced()


def test_dequantize_dispatcher_on_cpu_is_the_reference() -> None:
    w = torch.randn(7, 96)
    packed, state = quantize_4bit(w, 32, "nf4", True)
    assert torch.equal(
        kernels.dequantize_4bit(packed, state, torch.bfloat16), dequantize_4bit(packed, state, torch.bfloat16)
    )


def test_linear4bit_on_cpu_uses_the_reference_matmul() -> None:
    torch.manual_seed(0)
    layer = Linear4bit.from_weight(torch.randn(24, 64), blocksize=32)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(torch.float32)
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 24) @ w, rtol=0, atol=0)


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from minilora.quant import dequantize_4bit, quantize_4bit
    from minilora.kernels.dequant import dequantize_4bit_triton
    torch.manual_seed(0)
    # dequantize: bit-identical (float32 and float16; the interpreter truncates to bfloat16, the GPU rounds)
    for shape, bs, qt, dq in [((5, 77), 64, "fp4", False), ((3, 333), 32, "nf4", True), ((2, 1030), 512, "nf4", True)]:
        p, s = quantize_4bit(torch.randn(shape), bs, qt, dq)
        for dt in (torch.float32, torch.float16):
            assert torch.equal(dequantize_4bit(p, s, dt), dequantize_4bit_triton(p, s, dt)), (shape, bs, qt, dq, dt)
    # GEMV decode kernel: M = 1..16 rows, fp16 x (the interpreter truncates bf16), within fp16 rounding
    from minilora.kernels.gemv import gemv_4bit
    cases = [((20, 256), 64, "nf4", True, 1), ((33, 512), 32, "fp4", False, 3), ((8, 1024), 256, "nf4", True, 16)]
    for (n, k), bs, qt, dq, m in cases:
        p, s = quantize_4bit(torch.randn(n, k), bs, qt, dq)
        x = torch.randn(m, k).half()
        ref = x.float() @ dequantize_4bit(p, s, torch.float32).T
        got = gemv_4bit(x, p, s).float()
        assert got.shape == (m, n) and float((got - ref).norm() / ref.norm()) < 1e-3, ((n, k), m)
        # with a LoRA adapter's term in the epilogue (rank 12: padded to 16 inside), against W x + s B A x
        a, b = torch.randn(12, k).half() * 0.1, torch.randn(n, 12).half()
        h = x @ a.T
        from minilora.kernels.gemv import lora_down  # A x, one program per row of A
        hx = (x.float() @ a.float().T).half().float()
        torch.testing.assert_close(lora_down(x, a).float(), hx, atol=2e-3, rtol=2e-3)
        got = gemv_4bit(x, p, s, lora=(h, b, 0.5)).float()
        ref = ref + 0.5 * h.float() @ b.float().T
        assert float((got - ref).norm() / ref.norm()) < 1e-3, ((n, k), m, "lora")
        # the custom operator off CUDA (the reference sum), eager and traced through its fake by torch.compile
        from minilora.kernels.matmul import lora_linear_4bit
        fn = lambda x: lora_linear_4bit(x.float(), p, s, a.float(), b.float(), 0.5)
        for y in (fn(x), torch.compile(fn, backend="aot_eager", fullgraph=True)(x)):
            assert y.shape == (m, n) and float((y - ref).norm() / ref.norm()) < 1e-3, ((n, k), m, "lora op")
    # the small-M tensor-core kernel (5..64 rows) and the matmul's choice of path by rows
    from minilora.kernels.matmul import matmul_4bit, path_of
    p, s = quantize_4bit(torch.randn(96, 1024), 64, "nf4", True)
    for m, path in ((3, "triton-gemv"), (20, "triton-small-m"), (64, "triton-small-m"), (65, "triton")):
        x = torch.randn(m, 1024).half()
        ref = x.float() @ dequantize_4bit(p, s, torch.float16).float().T
        got = matmul_4bit(x, p, s).float()
        assert path_of(x, s) == path and float((got - ref).norm() / ref.norm()) < 1e-3, (m, path)
    # the tensor-core GEMV's plain-Triton twin of its PTX step (gemv_mma.py): layout, absmax, warps, epilogue
    from minilora.kernels.gemv_mma import gemv_4bit_mma
    for (n, k), bs, qt, dq, m, w in [((32, 256), 64, "nf4", True, 1, 4), ((16, 512), 128, "fp4", False, 3, 2),
                                     ((48, 1024), 256, "nf4", True, 8, None)]:
        p, s = quantize_4bit(torch.randn(n, k), bs, qt, dq)
        x = torch.randn(m, k).half()
        ref = x.float() @ dequantize_4bit(p, s, torch.float32).T
        a, b = torch.randn(12, k).half() * 0.1, torch.randn(n, 12).half()
        for lora, want in ((None, ref), ((x @ a.T, b, 0.5), ref + 0.5 * (x @ a.T).float() @ b.float().T)):
            got = gemv_4bit_mma(x, p, s, lora=lora, warps=w).float()
            assert got.shape == (m, n) and float((got - want).norm() / want.norm()) < 1e-3, ((n, k), m, lora is None)
    # its reordered copy of a weight follows an in-place write of that weight (load_state_dict copies in place)
    p, s = quantize_4bit(torch.randn(32, 256), 64, "nf4", False)
    x = torch.randn(1, 256).half()
    gemv_4bit_mma(x, p, s)
    p2, s2 = quantize_4bit(torch.randn(32, 256), 64, "nf4", False)
    p.copy_(p2), s.absmax.copy_(s2.absmax)
    ref = x.float() @ dequantize_4bit(p, s, torch.float32).T
    assert float((gemv_4bit_mma(x, p, s).float() - ref).norm() / ref.norm()) < 1e-3, "stale mma layout"
    # the row gather of a host-memory embedding (here every tensor is on the CPU): the table's rows, bit for bit
    from minilora.kernels.gather import gather_rows
    table, ids = torch.randn(300, 1500).bfloat16(), torch.randint(0, 300, (3, 7))
    assert torch.equal(gather_rows(table, ids), table[ids])
    print("interpreted kernels ok")
    """
)


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_triton_kernels_in_the_cpu_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted kernels ok" in done.stdout


def test_chunked_cross_entropy_equals_full_cross_entropy() -> None:
    from minilora.kernels.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    labels = torch.randint(0, 300, (2, 37))
    labels[0, :5] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_rows=10)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).reshape(-1, 300), labels.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_linear4bit_custom_op_compiles_without_graph_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's operator (minilora::matmul_4bit) passes opcheck and traces with fullgraph=True.

    On CPU the operator runs the reference; dispatch is forced onto it to exercise the traced path.
    """
    from minilora.kernels import matmul

    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(24, 128), 64, "nf4", True)
    x = torch.randn(3, 128, requires_grad=True)
    args = (x, packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset, 24, 128, 64, 256)
    torch.library.opcheck(matmul._matmul_op, args)

    layer = Linear4bit.from_weight(torch.randn(48, 128), compute_dtype=torch.float32)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    monkeypatch.setattr(dispatch, "use_fast_path", lambda t: True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-5)


def test_dispatch_checks_trace_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) reads the dispatch switches as constants (no importlib, no lru_cache)."""

    @torch.compile(fullgraph=True, backend="eager")
    def pick(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if dispatch.triton_available() and not dispatch.reference_forced() else x - 1

    expected = 1.0 if dispatch.triton_available() and not dispatch.reference_forced() else -1.0
    assert float(pick(torch.zeros(()))) == expected
