"""The GGUF file format: reading a llama.cpp model file and dequantizing its Q8_0 / Q4_0 / Q4_1 tensors
(Q5_0 / Q5_1 and the k-quants Q4_K / Q5_K / Q6_K: minilora.io.gguf_kquants).

GGUF (llama.cpp's single-file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)                 <- metadata: config + tokenizer
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data, each at its offset

All integers are little-endian; a string is a u64 byte length plus UTF-8 bytes. `ne[0]` is the
fastest-varying dimension, so a PyTorch weight of shape (out, in) is stored with ne = [in, out].

Quantized tensors are cut, row-major, into blocks of 32 values; each block is stored on its own:

    Q8_0  (34 bytes, 8.5 bits/param):  f16 d | 32 x int8 q               x = q * d
    Q4_0  (18 bytes, 4.5 bits/param):  f16 d | 16 bytes of nibbles       x = (q - 8) * d
    Q4_1  (20 bytes, 5.0 bits/param):  f16 d | f16 m | 16 bytes          x = q * d + m

In the 4-bit types byte j holds element j in its low nibble and element j + 16 in its high nibble.
Worked Q4_0 example: d = 0.5, byte 0 = 0x3A -> element 0 = (0xA - 8) * 0.5 = 1.0 and
element 16 = (0x3 - 8) * 0.5 = -2.5.

Read by `read_gguf`; minilora.io.gguf turns a Llama GGUF into a transformers-format directory.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilora.errors import CheckpointError
from minilora.io import gguf_kquants

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


# ----------------------------------------------------------------------------------------------------
# ggml tensor types
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: `block_size` values are stored in `type_size` bytes."""

    name: str
    type_id: int
    block_size: int
    type_size: int


GGML_TYPES: dict[int, GGMLType] = {
    t.type_id: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q4_K", 12, 256, 144),
        GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210),
        GGMLType("BF16", 30, 1, 2),
    )
}
# Names of types we recognise but cannot dequantize, for a helpful error message.
_OTHER_GGML_TYPES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block read as one float16, widened to float32: (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n_blocks, 16) bytes -> (n_blocks, 32) 4-bit values: low nibbles are elements 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (n_blocks, 34) uint8 -> (n_blocks, 32) float32: x = q * d."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 34, f"bad Q8_0 blocks {blocks.shape}"
    d = _f16_column(blocks, 0)  # (n_blocks, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n_blocks, 32)
    return q * d


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks (n_blocks, 18) uint8 -> (n_blocks, 32) float32: x = (q - 8) * d."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 18, f"bad Q4_0 blocks {blocks.shape}"
    d = _f16_column(blocks, 0)  # (n_blocks, 1)
    q = _nibbles(blocks[:, 2:]).float() - 8.0  # (n_blocks, 32), values -8..7
    return q * d


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks (n_blocks, 20) uint8 -> (n_blocks, 32) float32: x = q * d + m."""
    assert blocks.dtype == torch.uint8 and blocks.shape[1] == 20, f"bad Q4_1 blocks {blocks.shape}"
    d = _f16_column(blocks, 0)  # (n_blocks, 1)
    m = _f16_column(blocks, 2)  # (n_blocks, 1)
    q = _nibbles(blocks[:, 4:]).float()  # (n_blocks, 32), values 0..15
    return q * d + m


_DEQUANTIZERS = {
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "Q5_0": gguf_kquants.dequantize_q5_0,
    "Q5_1": gguf_kquants.dequantize_q5_1,
    "Q4_K": gguf_kquants.dequantize_q4_k,
    "Q5_K": gguf_kquants.dequantize_q5_k,
    "Q6_K": gguf_kquants.dequantize_q6_k,
}


def dequantize(raw: np.ndarray | torch.Tensor, ggml_type: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one tensor -> float32 tensor of `shape` (PyTorch order, last dim = ne[0])."""
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)) if isinstance(raw, np.ndarray) else raw
    data = data.reshape(-1)  # flat uint8 bytes
    n = int(np.prod(shape)) if shape else 1
    if ggml_type.name == "F32":
        out = data.view(torch.float32).clone()
    elif ggml_type.name == "F16":
        out = data.view(torch.float16).float()
    elif ggml_type.name == "BF16":
        out = data.view(torch.bfloat16).float()
    else:
        blocks = data.view(-1, ggml_type.type_size)  # (n_blocks, type_size)
        out = _DEQUANTIZERS[ggml_type.name](blocks).reshape(-1)
    assert out.numel() == n, f"{ggml_type.name}: {out.numel()} values for shape {shape}"
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------------------------------


@dataclass
class GGUFTensorInfo:
    """Where one tensor lives: `shape` is in PyTorch order (reversed ne), `offset` is absolute."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    n_bytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata and a memory map of its tensor data."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)
    _mmap: np.memmap | None = None

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name` (a read-only view into the memory map)."""
        info = self.tensors[name]
        assert self._mmap is not None, "file not mapped"
        return self._mmap[info.offset : info.offset + info.n_bytes]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32, in the file's layout (no q/k un-permutation)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)


# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reader over a byte buffer; errors name the file."""

    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF file (wanted {n} bytes at offset {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)).tobytes())[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).tobytes().decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY_DTYPES:  # numeric arrays in one read (token types, scores)
                dt = np.dtype(_NUMPY_DTYPES[etype])
                arr = np.frombuffer(self.take(n * dt.itemsize).tobytes(), dtype=dt)
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            return [self.value(etype, key) for _ in range(n)]
        raise CheckpointError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF file; tensor data stays memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if len(buf) < 24 or bytes(buf[:4]) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
    cur = _Cursor(buf, path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(f"{path}: unsupported GGUF version {version}{hint}; expected 2 or 3")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"), key)

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, ne, type_id, offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment

    gf = GGUFFile(path=path, version=version, metadata=metadata, _mmap=buf)
    for name, ne, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            type_name = _OTHER_GGML_TYPES.get(type_id, f"type id {type_id}")
            supported = ", ".join(t.name for t in GGML_TYPES.values())
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported type {type_name} (supported: {supported})")
        gtype = GGML_TYPES[type_id]
        n_elements = int(np.prod(ne)) if ne else 1
        if ne and ne[0] % gtype.block_size:
            raise CheckpointError(f"{path}: tensor {name!r} row length {ne[0]} is not a multiple of {gtype.block_size}")
        n_bytes = n_elements // gtype.block_size * gtype.type_size
        start = data_start + offset
        if start + n_bytes > len(buf):
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        gf.tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), gtype, start, n_bytes)
    return gf


# ---------------------------------------------------------------------------------------------- metadata
# Shared by the Llama (io/gguf.py) and Gemma-3 (io/gguf_gemma3.py) importers.
PROJECTION_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


def meta_value(gf: GGUFFile, key: str, default: Any = None) -> Any:
    """Metadata value `key`; without a default, a missing key is a ValueError naming file and key."""
    if key in gf.metadata:
        return gf.metadata[key]
    if default is None:
        raise CheckpointError(f"{gf.path}: missing metadata key {key!r}")
    return default


def f32_decimal(x: float) -> float:
    """Shortest decimal that round-trips a float32 (9.999999747378752e-06 -> 1e-05), as configs write it."""
    return float(str(np.float32(x)))


def rope_scaling_of(gf: GGUFFile, arch: str) -> dict[str, Any] | None:
    """`<arch>.rope.scaling.*` as a transformers rope_scaling dict (linear only), None without scaling."""
    scaling_type = gf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        return {"type": "linear", "factor": f32_decimal(meta_value(gf, f"{arch}.rope.scaling.factor"))}
    if scaling_type != "none":
        raise CheckpointError(f"{gf.path}: {arch}.rope.scaling.type={scaling_type!r} is not supported")
    return None


def special_token_ids(gf: GGUFFile) -> dict[str, int | None]:
    """bos/eos/pad token ids of the tokenizer metadata, as config.json keys (None where absent)."""
    ids = {}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = gf.metadata.get(f"tokenizer.ggml.{name}_token_id")
        ids[key] = None if v is None else int(v)
    return ids


def check_complete(gf: GGUFFile, state: dict[str, torch.Tensor], n_layers: int, block_names: Any) -> None:
    """A ValueError naming the file and the first missing tensors unless every layer's tensors are there."""
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in block_names}
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(f"{gf.path}: missing tensors for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
