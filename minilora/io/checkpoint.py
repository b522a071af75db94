"""Reading and writing transformers-layout checkpoints: safetensors, single file or sharded.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {key: shard file}}``). :class:`CheckpointReader`
opens every file lazily through ``safetensors.safe_open`` (memory-mapped) and hands out one tensor at a
time, so a loader never holds more than the tensor it is placing. Shapes and dtypes are read from the
headers alone, which lets a loader validate every key and shape before it reads a single weight.

Pickle checkpoints (``pytorch_model.bin``) can run code when unpickled; they are refused unless the caller
passes ``allow_pickle=True``, and are then read with ``torch.load(weights_only=True)``.

Every problem is reported with the file and key it concerns: :class:`CheckpointError` (a ValueError) for a
corrupted or truncated file, a missing/unexpected key or a wrong shape; FileNotFoundError for a missing
file or shard. Writes are atomic: a temporary file in the target directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minilora.errors import CheckpointError
from minilora.io.safe_write import check_output, readable_disk_errors, staged_files, write_bytes
from minilora.quant.state import dtype_name

logger = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Bytes per page-locked staging buffer when reading onto a GPU (two are used in turn): large enough for the
# copies to run near PCIe speed, small enough to cost little host memory.
STAGING_BYTES = 16 << 20
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """Lazy, key-by-key access to the tensors of a checkpoint directory (or a single .safetensors file).

    >>> with CheckpointReader("tiny-llama") as ckpt:
    ...     ckpt.shape("model.norm.weight"), ckpt.file_of("model.norm.weight").name
    ((64,), 'model.safetensors')
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        path = Path(path)
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, Any] = {}  # safe_open handles, or state dicts for pickle files
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}  # safetensors header, data offset
        # page-locked buffers of get_on (CUDA), each with the event of the last copy made from it
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._staged = 0  # copies made through them so far
        self._landing: dict[tuple[int, torch.device], torch.Tensor] = {}  # GPU buffers of get_on's casts
        self.is_pickle = False
        if path.is_file():
            self.source = path  # what error messages call "the checkpoint"
            self.weight_map = self._single_file_map(path)
            return
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint path {path} does not exist")
        if (path / SAFE_INDEX).is_file():
            self.source = path / SAFE_INDEX
            self.weight_map = self._read_index(self.source)
        elif (path / SAFE_SINGLE).is_file():
            self.source = path / SAFE_SINGLE
            self.weight_map = self._single_file_map(self.source)
        elif (path / PICKLE_INDEX).is_file() or (path / PICKLE_SINGLE).is_file():
            self.is_pickle = True
            self.source = path / PICKLE_INDEX if (path / PICKLE_INDEX).is_file() else path / PICKLE_SINGLE
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.source} is a pickle checkpoint, which can execute code when loaded; refusing it. "
                    "Convert it to safetensors, or pass allow_pickle=True if you trust its origin "
                    "(it is then read with torch.load(weights_only=True))."
                )
            if self.source.name == PICKLE_INDEX:
                self.weight_map = self._read_index(self.source)
            else:
                self.weight_map = {k: self.source for k in self._open(self.source).keys()}
        else:
            raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path} (nor a pickle {PICKLE_SINGLE})")

    # -- opening
    def _single_file_map(self, file: Path) -> dict[str, Path]:
        if file.suffix == ".bin":
            self.is_pickle = True
            if not self.allow_pickle:
                raise CheckpointError(f"{file} is a pickle checkpoint; pass allow_pickle=True to read it")
        return {k: file for k in self._keys_of(file)}

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index} is not valid JSON: {e}") from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        out: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            file = index.parent / shard
            if not file.is_file():
                key = next(k for k, v in weight_map.items() if v == shard)
                raise FileNotFoundError(f"shard {file} listed in {index} (e.g. for key {key!r}) does not exist")
            present = set(self._keys_of(file))
            for key, where in weight_map.items():
                if where == shard and key not in present:
                    raise CheckpointError(f"{index} maps key {key!r} to {file}, which does not contain it")
        for key, shard in weight_map.items():
            out[key] = index.parent / shard
        return out

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is not None:
            return handle
        if file.suffix == ".bin":
            try:
                handle = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
                raise CheckpointError(f"cannot read pickle checkpoint {file}: {e}") from e
        else:
            try:
                handle = safe_open(os.fspath(file), framework="pt", device="cpu")
            except SafetensorError as e:
                raise CheckpointError(f"{file} is not a valid safetensors file (truncated or corrupted?): {e}") from e
        self._handles[file] = handle
        return handle

    def _keys_of(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    # -- queries
    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def file_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        if key not in self.weight_map:
            raise CheckpointError(f"key {key!r} is missing from {self.source}")
        return self.weight_map[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file header (no data read for safetensors)."""
        handle = self._open(self.file_of(key))
        if self.is_pickle:
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """The tensor's stored dtype, read from the file header."""
        handle = self._open(self.file_of(key))
        if self.is_pickle:
            return handle[key].dtype
        name = handle.get_slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise CheckpointError(f"{self.file_of(key)}: key {key!r} has unsupported dtype {name}")
        return _ST_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (on CPU, in its stored dtype).

        safetensors data is read with plain file reads into a fresh tensor rather than through the memory
        map: pages of a mapped file stay in the process's resident memory until the map closes, so reading
        through it would make the peak memory of a load grow with the checkpoint's size.
        """
        file = self.file_of(key)
        handle = self._open(file)
        if self.is_pickle:
            return handle[key]
        start, shape, dtype = self._locate(key)
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
        with open(file, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(buffer)) != buffer.nbytes:
                raise CheckpointError(f"{file}: cannot read key {key!r}: the file is truncated")
        return out

    def get_on(self, key: str, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor onto `device`, in `dtype` if given (floating point only) else its stored dtype.

        For a CUDA device the bytes go through two small page-locked buffers in turn (STAGING_BYTES each):
        the file is read into one while the other is copied to the GPU, so no host tensor of the whole size
        is made, and the copies run at page-locked speed. (Reading into a fresh host tensor and then copying
        it took 0.62 s of a 0.82 s load of 1.39 GB on an H200 host: page faults, a pageable copy, a CPU cast;
        benchmarks/gpu/loading_probe.py.) A cast happens on the GPU piece by piece: each piece lands in one of
        two GPU buffers of the same size and is cast from there into the result, so the tensor never exists
        on the GPU in both dtypes at once.
        """
        device = torch.device(device)
        if device.type != "cuda" or self.is_pickle:
            tensor = self.get(key).to(device)
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        file = self.file_of(key)
        self._open(file)
        start, shape, stored = self._locate(key)
        cast = dtype is not None and dtype != stored and stored.is_floating_point
        out = torch.empty(shape, dtype=dtype if cast else stored, device=device)
        nbytes = out.numel() * stored.itemsize
        with torch.cuda.device(device), open(file, "rb") as f:  # the copies go on the target device's stream
            stream = torch.cuda.current_stream(device)
            f.seek(start)
            for begin in range(0, nbytes, STAGING_BYTES):  # a multiple of every element size
                size = min(STAGING_BYTES, nbytes - begin)
                k = self._staged % 2
                buffer = self._next_staging_buffer()  # waits until its previous copy has finished
                if f.readinto(memoryview(buffer[:size].numpy())) != size:
                    raise CheckpointError(f"{file}: cannot read key {key!r}: the file is truncated")
                if cast:  # into a GPU buffer, then cast into the result (both in stream order)
                    landing = self._gpu_landing(k, device)[:size]
                    landing.copy_(buffer[:size], non_blocking=True)
                    first = begin // stored.itemsize
                    out.view(-1)[first : first + size // stored.itemsize].copy_(landing.view(stored))
                else:
                    out.view(-1).view(torch.uint8)[begin : begin + size].copy_(buffer[:size], non_blocking=True)
                done = torch.cuda.Event()  # a fresh event each time: the next copy may go to another device
                done.record(stream)
                self._staging[k] = (buffer, done)
                self._staged += 1
        return out

    def _gpu_landing(self, k: int, device: torch.device) -> torch.Tensor:
        """GPU buffer k (of two, STAGING_BYTES each) on `device`, for pieces that are cast on arrival."""
        if self._landing.get((k, device)) is None:
            self._landing[(k, device)] = torch.empty(STAGING_BYTES, dtype=torch.uint8, device=device)
        return self._landing[(k, device)]

    def _next_staging_buffer(self) -> torch.Tensor:
        """The page-locked buffer to fill next (they alternate across calls, so consecutive tensors overlap
        too), once the copy made from it last has finished; made on first use."""
        k = self._staged % 2
        if len(self._staging) <= k:
            self._staging.append((torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True), None))
        buffer, done = self._staging[k]
        if done is not None:
            done.synchronize()
        return buffer

    def _locate(self, key: str) -> tuple[int, list[int], torch.dtype]:
        """(file offset of the data, shape, dtype) of a safetensors entry, its header checked."""
        file = self.file_of(key)
        header, data_start = self._header(file)
        info = header.get(key)
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: cannot read key {key!r}: bad or unsupported header entry {info!r}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        needed = math.prod(info["shape"]) * torch.empty(0, dtype=dtype).element_size()
        if needed != end - begin:
            raise CheckpointError(f"{file}: key {key!r} spans {end - begin} bytes, its shape needs {needed}")
        return data_start + begin, info["shape"], dtype

    def _header(self, file: Path) -> tuple[dict[str, Any], int]:
        """The parsed safetensors header of `file` and the offset where its data starts (cached)."""
        if file not in self._headers:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            self._headers[file] = (header, 8 + length)
        return self._headers[file]

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the first file (empty for pickle checkpoints)."""
        if self.is_pickle or not self.weight_map:
            return {}
        return self._open(next(iter(self.weight_map.values()))).metadata() or {}

    def close(self) -> None:
        """Drop the file handles (the memory maps close with them) and the staging buffers."""
        self._handles.clear()
        for _, done in self._staging:
            if done is not None:
                done.synchronize()
        self._staging.clear()
        self._landing.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into a dict (convenience for small models and tests)."""
    with CheckpointReader(path, allow_pickle=allow_pickle) as ckpt:
        return {k: ckpt.get(k) for k in ckpt.keys()}


def check_finite(tensor: torch.Tensor, file: str | os.PathLike, key: str) -> None:
    """CheckpointError naming file, key and count when a float tensor holds NaN or Inf (one pass; at load only)."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = ~torch.isfinite(tensor.reshape(-1))
    first = int(bad.nonzero()[0, 0])
    raise CheckpointError(
        f"{file}: key {key!r} holds {int(bad.sum())} non-finite value(s) (NaN/Inf) among {tensor.numel()} "
        f"({tensor.dtype}), the first at flat index {first} ({tensor.reshape(-1)[first].item()}); the file is "
        "corrupted or was saved from a diverged run: refusing to build a model from it"
    )


# Where from_pretrained records the directory a model came from: its writers refuse to write there.
SOURCE_ATTR = "loaded_from"


def check_output_is_not_source(model: nn.Module, directory: str | os.PathLike) -> None:
    """CLIError if ``directory`` is, holds or lies inside the checkpoint ``model`` was loaded from."""
    check_output(directory, [getattr(model, SOURCE_ATTR, None)])


# ---------------------------------------------------------------------------------------------- writing
def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a .safetensors file atomically; metadata defaults to ``{"format": "pt"}``."""
    path = Path(path)
    with staged_files(path.parent) as stage:
        _write_safetensors(tensors, stage(path.name), metadata, path)


def _write_safetensors(
    tensors: Mapping[str, torch.Tensor], tmp: Path, metadata: dict[str, str] | None, final: Path
) -> None:
    meta = {"format": "pt", **(metadata or {})}
    # safetensors refuses tensors that share storage or are non-contiguous: store independent copies.
    plain = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    with readable_disk_errors(final):
        save_file(plain, tmp, metadata=meta)


def save_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[Path]:
    """Write tensors as ``model.safetensors``, or as shards + index when they exceed ``max_shard_size`` bytes.

    Shards are named as transformers names them (``model-00001-of-00003.safetensors``). A stale single
    file or index from an earlier save in the same directory is removed so loaders see one checkpoint.
    ``extra_files`` (name -> bytes, e.g. config.json) are written with them. Every file goes under a
    temporary name first and all are renamed together at the end (``staged_files``): a failure while
    writing any of them leaves the directory's old files byte-identical.
    """
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with staged_files(directory) as stage:
        for name, shard in zip(names, shards, strict=True):
            _write_safetensors(shard, stage(name), metadata, directory / name)
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
            total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_bytes(stage(SAFE_INDEX), (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        for name, data in (extra_files or {}).items():
            write_bytes(stage(name), data)
    (directory / (SAFE_INDEX if len(shards) == 1 else SAFE_SINGLE)).unlink(missing_ok=True)
    return [directory / name for name in names]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent tensors by transformers key, without the tied ``lm_head.weight``."""
    tensors = dict(model.state_dict())
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Any | None = None,
    max_shard_size: int | None = None,
) -> None:
    """Write ``config.json`` and the float weights (``model.safetensors`` or shards) of a model.

    ``config`` is a :class:`minilora.models.config.ModelConfig` (default: ``model.config``). The dtype
    recorded in config.json is the dtype of the saved embedding matrix. Quantized models are written with
    :func:`minilora.loading.save_quantized` instead.
    """
    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise ValueError("save_pretrained needs a config: pass config= or give the model a .config")
    tensors = model_tensors(model)
    float_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    odd = [k for k, t in tensors.items() if t.dtype not in float_dtypes]
    if odd:
        raise ValueError(
            f"save_pretrained writes float checkpoints; {odd[0]!r} is {tensors[odd[0]].dtype} "
            "(use minilora.loading.save_quantized for quantized models)"
        )
    out_config = _replace_config(config, quantization_config=None, dtype=_dtype_name(tensors))
    check_output_is_not_source(model, directory)
    save_checkpoint(
        tensors, directory, max_shard_size=max_shard_size, extra_files={"config.json": out_config.to_json_bytes()}
    )


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str | None:
    t = tensors.get("model.embed_tokens.weight")
    if t is None:
        return None
    return dtype_name(t.dtype)


def _replace_config(config: Any, quantization_config: dict[str, Any] | None, dtype: str | None) -> Any:
    """A copy of a ModelConfig with a new quantization_config and torch_dtype."""
    return dataclasses.replace(config, quantization_config=quantization_config, torch_dtype=dtype or config.torch_dtype)
