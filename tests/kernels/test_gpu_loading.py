"""Loading onto a GPU through the page-locked staging buffers (CheckpointReader.get_on), skipped without CUDA.

pytest -m gpu tests/kernels
"""

from __future__ import annotations

import pytest
import torch

from minilora.io import checkpoint
from minilora.io.checkpoint import CheckpointError, CheckpointReader
from minilora.loading import from_pretrained

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("staging_bytes", [checkpoint.STAGING_BYTES, 1000])  # 1000: many chunks, ragged ends
def test_tensors_read_onto_the_gpu_equal_those_read_on_the_cpu(hf_tiny_llama_dir, monkeypatch, staging_bytes):
    monkeypatch.setattr(checkpoint, "STAGING_BYTES", staging_bytes)
    with CheckpointReader(hf_tiny_llama_dir) as ckpt:
        for key in ckpt.keys():
            on_gpu = ckpt.get_on(key, "cuda")
            assert on_gpu.is_cuda and on_gpu.dtype == ckpt.dtype(key) and tuple(on_gpu.shape) == ckpt.shape(key)
            assert torch.equal(on_gpu.cpu(), ckpt.get(key)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_loaded_onto_the_gpu_equals_the_cpu_load(hf_tiny_llama_dir, dtype):
    on_gpu = from_pretrained(hf_tiny_llama_dir, dtype=dtype, device="cuda")
    on_cpu = from_pretrained(hf_tiny_llama_dir, dtype=dtype, device="cpu")
    gpu_params = dict(on_gpu.named_parameters())
    for name, p in on_cpu.named_parameters():
        assert gpu_params[name].is_cuda and torch.equal(gpu_params[name].cpu(), p), name


def test_a_file_truncated_after_opening_is_reported_on_the_gpu_path(hf_tiny_llama_dir, tmp_path):
    import shutil

    for f in hf_tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    with CheckpointReader(tmp_path) as ckpt:
        last = max(ckpt.keys(), key=lambda k: ckpt._locate(k)[0])  # the tensor at the end of its file
        shard = ckpt.file_of(last)
        shard.write_bytes(shard.read_bytes()[:-100])  # cut after the header was read: get_on's own check
        with pytest.raises(CheckpointError, match="truncated"):
            ckpt.get_on(last, "cuda")


def _mixed_checkpoint(path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(1001, 7, generator=g),
        "bf16": torch.randn(333, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, 5, generator=g).to(torch.float16),
        "i64": torch.arange(17),
        "scalar": torch.tensor(3.25),
    }
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("staging_bytes", [checkpoint.STAGING_BYTES, 1000])  # 1000: pieces cut mid-row
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_cast_on_the_way_equals_the_cast_on_the_cpu(tmp_path, monkeypatch, staging_bytes, dtype):
    monkeypatch.setattr(checkpoint, "STAGING_BYTES", staging_bytes)
    tensors = _mixed_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as ckpt:
        for key, stored in tensors.items():
            got = ckpt.get_on(key, "cuda", dtype)
            want = stored.to(dtype) if stored.is_floating_point() else stored  # integers keep their dtype
            assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape, key
            assert torch.equal(got.cpu(), want), key


def test_a_cast_on_the_way_never_holds_both_dtypes_on_the_gpu(tmp_path, monkeypatch):
    """Peak GPU memory of reading a 64 MB float32 tensor as bfloat16: the 32 MB result + two 1 MB buffers."""
    from safetensors.torch import save_file

    monkeypatch.setattr(checkpoint, "STAGING_BYTES", 1 << 20)
    save_file({"w": torch.randn(4096, 4096)}, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as ckpt:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = ckpt.get_on("w", "cuda", torch.bfloat16)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert torch.equal(got.cpu(), ckpt.get("w").to(torch.bfloat16))
    assert peak <= 4096 * 4096 * 2 + 2 * (1 << 20) + (1 << 20), peak  # + 1 MB of allocator rounding
