"""The quantization state of a 4-bit tensor and its bitsandbytes checkpoint format.

A 4-bit weight is the packed codes plus a `QuantState`: one absmax per block (float32, or uint8 codes
with double quantization), the code table, the original shape and dtype. With double quantization the
absmax codes need a second, nested state (`state2`: one float32 absmax per 256 absmax, the 8-bit code)
and the mean `offset` that was subtracted before quantizing them.

Serialized as transformers + bitsandbytes write it (formats.md section 3), for a module prefix `P.`:
`P.weight` (packed), `P.weight.absmax`, `P.weight.quant_map`, `P.weight.nested_absmax`,
`P.weight.nested_quant_map` and `P.weight.quant_state.bitsandbytes__nf4` (UTF-8 JSON of the rest).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from minilora.errors import QuantStateError

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of the checkpoint JSON."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise QuantStateError(f"{where}: unknown dtype {name!r}")
    return dtype


@dataclass
class NestedState:
    """Double quantization of the absmax: 8-bit codes scaled per `blocksize` absmax values."""

    absmax: torch.Tensor  # float32 (ceil(n_blocks / blocksize),)
    code: torch.Tensor  # float32 (256,), the signed dynamic map
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """Everything but the packed codes that `dequantize_4bit` needs; field names follow bitsandbytes."""

    absmax: torch.Tensor  # float32 (n_blocks,), or uint8 codes when state2 is set
    shape: torch.Size
    code: torch.Tensor  # float32 (16,)
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # of the original tensor, and of dequantize's output
    offset: torch.Tensor | None = None  # float32 scalar, double quant only
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def nbytes(self) -> int:
        """True bytes of the state: absmax, nested absmax and the code tables (JSON not counted)."""
        total = self.absmax.numel() * self.absmax.element_size() + self.code.numel() * 4
        if self.state2 is not None:
            total += self.state2.absmax.numel() * 4 + self.state2.code.numel() * 4 + 4
        return total

    def to(self, device: torch.device | str) -> QuantState:
        state2 = None
        if self.state2 is not None:
            s2 = self.state2
            state2 = NestedState(s2.absmax.to(device), s2.code.to(device), s2.blocksize, s2.dtype)
        return QuantState(
            self.absmax.to(device),
            self.shape,
            self.code.to(device),
            self.blocksize,
            self.quant_type,
            self.dtype,
            None if self.offset is None else self.offset.to(device),
            state2,
        )

    # ---- the bitsandbytes checkpoint format -------------------------------------------------------

    def as_dict(self, packed: bool = True) -> dict[str, torch.Tensor | object]:
        """Keys as bitsandbytes' `QuantState.as_dict` names them (without the `weight.` prefix).

        packed=True folds the non-tensor items into one uint8 tensor holding their JSON, which is what
        lands in a safetensors file as `quant_state.bitsandbytes__<type>`.
        """
        items: dict[str, torch.Tensor | object] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.state2 is not None:
            assert self.offset is not None, "double-quantized state without offset"
            items.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed:
            return items
        tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
        blob = json.dumps({k: v for k, v in items.items() if not isinstance(v, torch.Tensor)})
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob.encode("utf-8")), dtype=torch.uint8
        )
        return tensors

    @classmethod
    def from_dict(cls, items: dict[str, torch.Tensor], where: str = "quant state") -> QuantState:
        """Read the keys `as_dict(packed=True)` writes (prefixes already stripped up to `weight.`).

        `where` names the module in error messages. Every missing key, unknown quant type or shape that
        disagrees with the JSON raises QuantStateError (a ValueError) naming it.
        """
        blob_keys = [k for k in items if k.startswith("quant_state.bitsandbytes__")]
        if len(blob_keys) != 1:
            raise QuantStateError(
                f"{where}: expected exactly one 'quant_state.bitsandbytes__nf4|fp4' entry, found {blob_keys}"
            )
        try:
            meta = json.loads(bytes(items[blob_keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise QuantStateError(f"{where}: {blob_keys[0]} is not UTF-8 JSON ({err})") from err
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise QuantStateError(f"{where}: {blob_keys[0]} lacks {key!r}")
        quant_type = meta["quant_type"]
        if quant_type not in QUANT_TYPES or blob_keys[0] != f"quant_state.bitsandbytes__{quant_type}":
            raise QuantStateError(f"{where}: quant_type {quant_type!r} (key {blob_keys[0]}) is not nf4 or fp4")
        blocksize = int(meta["blocksize"])
        if blocksize not in VALID_BLOCKSIZES:
            raise QuantStateError(f"{where}: blocksize {blocksize} not in {VALID_BLOCKSIZES}")
        shape = torch.Size(meta["shape"])
        nested = "nested_offset" in meta
        required = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if nested else [])
        missing = [k for k in required if k not in items]
        if missing:
            raise QuantStateError(f"{where}: missing {missing}")
        n_blocks = -(-math.prod(shape) // blocksize)
        absmax, code = items["absmax"], items["quant_map"]
        expect_absmax_dtype = torch.uint8 if nested else torch.float32
        if absmax.shape != (n_blocks,) or absmax.dtype != expect_absmax_dtype:
            raise QuantStateError(
                f"{where}: absmax is {tuple(absmax.shape)} {absmax.dtype}, but shape {list(shape)} with "
                f"blocksize {blocksize} needs ({n_blocks},) {expect_absmax_dtype}"
            )
        if code.shape != (16,):
            raise QuantStateError(f"{where}: quant_map has shape {tuple(code.shape)}, expected (16,)")
        state2, offset = None, None
        if nested:
            nested_blocksize = int(meta.get("nested_blocksize", 256))
            nested_absmax = items["nested_absmax"]
            n_nested = -(-n_blocks // nested_blocksize)
            if nested_absmax.shape != (n_nested,):
                raise QuantStateError(
                    f"{where}: nested_absmax has shape {tuple(nested_absmax.shape)}, expected ({n_nested},)"
                )
            if items["nested_quant_map"].shape != (256,):
                raise QuantStateError(f"{where}: nested_quant_map must have shape (256,)")
            state2 = NestedState(
                nested_absmax.float(),
                items["nested_quant_map"].float(),
                nested_blocksize,
                dtype_from_name(meta.get("nested_dtype", "float32"), where),
            )
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        return cls(
            absmax=absmax,
            shape=shape,
            code=code.float(),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype_from_name(meta["dtype"], where),
            offset=offset,
            state2=state2,
        )


def check_state_fits(packed: torch.Tensor, state: QuantState, where: str = "dequantize_4bit") -> None:
    """QuantStateError unless `state` describes exactly the codes in `packed` (sizes only: no data is read).

    A state of another shape would otherwise decode a part of the codes, or read past them, without a word.
    """
    n = state.numel
    problems = []
    # Codes padded up to the end of the last block (a buffer filled block by block) are accepted; more or
    # fewer bytes mean the state belongs to other codes.
    least, most = (n + 1) // 2, -(-state.n_blocks * state.blocksize // 2)
    if not least <= packed.numel() <= most:
        problems.append(f"the codes hold {packed.numel()} bytes, its shape {list(state.shape)} needs {least}")
    if state.absmax.numel() != state.n_blocks:
        problems.append(
            f"absmax has {state.absmax.numel()} values, shape {list(state.shape)} in blocks of {state.blocksize} "
            f"needs {state.n_blocks}"
        )
    if state.code.numel() != 16:
        problems.append(f"the code table has {state.code.numel()} values, not 16")
    if state.state2 is not None:
        n_nested = -(-state.n_blocks // state.state2.blocksize)
        if state.state2.absmax.numel() != n_nested:
            problems.append(f"nested_absmax has {state.state2.absmax.numel()} values, {n_nested} needed")
        if state.state2.code.numel() != 256:
            problems.append(f"the nested code table has {state.state2.code.numel()} values, not 256")
        if state.offset is None:
            problems.append("a double-quantized state without its offset")
    if problems:
        raise QuantStateError(f"{where}: the quant state does not fit the codes: " + "; ".join(problems))
