"""Writing GGUF (the layout in gguf_format.py's docstring): a merged Llama as F32 / F16 / BF16 / Q8_0 / Q4_0.

The quantizers follow ggml's reference (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`), block of 32:

    Q8_0   d = absmax / 127,        q = round_half_away(x / d)                  in [-127, 127]
    Q4_0   d = x[argmax |x|] / -8,  q = min(15, trunc(x / d + 8.5))             in [0, 15]
    d stored as f16; the quotient uses d in float32 (before rounding to f16), as ggml does.

Worked Q8_0 example: a block with absmax 2.54 has d = 0.02; x = -1.0 -> q = -50 -> read back -50 * f16(0.02).

Tensor names and the q/k row order are llama.cpp's: the inverse of minilora.io.gguf (hf_name,
unpermute_qk). Metadata values are typed from Python: int -> u32 (i64 if negative or large), float -> f32,
bool, str, list -> array of its first element's type (ints as i32); pass GGUFValue to choose.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilora.io.gguf_format import DEFAULT_ALIGNMENT, GGML_TYPES, GGUF_MAGIC, GGMLType
from minilora.io.safe_write import atomic_write_bytes

GGML_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64 = 4, 5, 6, 7, 8, 9, 10, 11
_FORMATS = {_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?", _U64: "<Q", _I64: "<q"}


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with an explicit GGUF type id (for arrays: the element type)."""

    type_id: int
    value: Any


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_q8_0(x: torch.Tensor) -> bytes:
    """Q8_0 blocks of `x` (numel a multiple of 32), row-major."""
    blocks = x.detach().to(torch.float32).reshape(-1, 32).cpu().numpy()  # (n_blocks, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = _round_half_away(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)  # (n, 2 + 32)
    return out.tobytes()


def quantize_q4_0(x: torch.Tensor) -> bytes:
    """Q4_0 blocks of `x`: byte j holds element j (low nibble) and element j + 16 (high nibble)."""
    blocks = x.detach().to(torch.float32).reshape(-1, 32).cpu().numpy()
    imax = np.abs(blocks).argmax(axis=1, keepdims=True)
    d = np.take_along_axis(blocks, imax, axis=1) / -8
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc(blocks * inv + 8.5).clip(0, 15).astype(np.uint8)  # (n, 32)
    packed = q[:, :16] | (q[:, 16:] << 4)  # (n, 16)
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1).tobytes()


def tensor_bytes(x: torch.Tensor, type_name: str) -> bytes:
    """The stored bytes of `x` as ggml type `type_name` (F32, F16, BF16, Q8_0, Q4_0)."""
    x = x.detach().cpu().contiguous()
    if type_name == "F32":
        return x.to(torch.float32).numpy().tobytes()
    if type_name == "F16":
        return x.to(torch.float16).numpy().tobytes()
    if type_name == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    if x.numel() % 32:
        raise ValueError(f"{type_name} needs a multiple of 32 values per tensor, got shape {tuple(x.shape)}")
    if type_name == "Q8_0":
        return quantize_q8_0(x)
    if type_name == "Q4_0":
        return quantize_q4_0(x)
    raise ValueError(f"GGUF export type {type_name!r}: use one of F32, F16, BF16, Q8_0, Q4_0")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _infer_type(value: Any) -> int:
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _U32 if 0 <= value < 2**32 else _I64
    if isinstance(value, float):
        return _F32
    if isinstance(value, str):
        return _STRING
    if isinstance(value, (list, tuple)):
        return _ARRAY
    raise ValueError(f"GGUF metadata: cannot store a {type(value).__name__}")


def _scalar(type_id: int, value: Any) -> bytes:
    return _string(value) if type_id == _STRING else struct.pack(_FORMATS[type_id], value)


def _value(value: Any) -> bytes:
    """u32 type id + payload; arrays as u32 element type + u64 count + elements."""
    if isinstance(value, GGUFValue):
        if isinstance(value.value, (list, tuple)):
            return struct.pack("<IIQ", _ARRAY, value.type_id, len(value.value)) + b"".join(
                _scalar(value.type_id, v) for v in value.value
            )
        return struct.pack("<I", value.type_id) + _scalar(value.type_id, value.value)
    type_id = _infer_type(value)
    if type_id != _ARRAY:
        return struct.pack("<I", type_id) + _scalar(type_id, value)
    element = _I32 if value and isinstance(value[0], int) and not isinstance(value[0], bool) else None
    element = element or (_infer_type(value[0]) if value else _U32)
    return _value(GGUFValue(element, list(value)))


def write_gguf(
    path: str | os.PathLike,
    metadata: dict[str, Any],
    tensors: dict[str, tuple[torch.Tensor, str]],
    alignment: int = DEFAULT_ALIGNMENT,
) -> Path:
    """Write a GGUF v3 file atomically: `tensors` maps a name to (tensor in PyTorch layout, ggml type name)."""
    header = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    header += [_string(key) + _value(value) for key, value in metadata.items()]
    datas, offset = [], 0
    for name, (tensor, type_name) in tensors.items():
        data = tensor_bytes(tensor, type_name)
        ne = list(reversed(tensor.shape))  # ne[0] is the fastest-varying dimension
        header.append(_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne))
        header.append(struct.pack("<IQ", GGML_BY_NAME[type_name].type_id, offset))
        pad = -len(data) % alignment
        datas.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"".join(header)
    head += b"\0" * (-len(head) % alignment)
    path = Path(path)
    atomic_write_bytes(path, head + b"".join(datas))
    return path
