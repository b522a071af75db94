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
