"""Training checkpoints that survive a kill at any moment, and resume bit for bit.

A checkpoint is a directory ``<output_dir>/checkpoints/checkpoint-<step:06d>/``:

    adapter/adapter_config.json, adapter/adapter_model.safetensors   the LoRA adapter (PEFT format)
    optimizer.pt        AdamW's state_dict (moments, step counts, param groups)
    scheduler.pt        the LR scheduler's state_dict
    rng.pt              torch (CPU and CUDA), Python ``random`` and NumPy generator states
    trainer_state.json  step, data position (epoch, batch index), tokens seen; written LAST

Atomicity: everything is written into a hidden sibling ``.tmp-checkpoint-...`` directory, each file is
fsynced, then the directory is renamed to its final name (a rename within one filesystem is atomic) and
the parent directory is fsynced. So a directory named ``checkpoint-N`` is always complete; a run killed
while writing leaves only a hidden temp directory, which :func:`latest_checkpoint` ignores and
:func:`clean_temp_dirs` removes. Only the newest ``keep_last`` checkpoints are kept.

The .pt files are written by this library and read back with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minilora.errors import AdapterError, CheckpointError
from minilora.io.safe_write import fsync_dir, readable_disk_errors

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save + fsync; a write failure (a full disk, which torch reports as a bare RuntimeError of its zip
    writer) becomes an OSError naming the file."""
    with readable_disk_errors(path):
        try:
            torch.save(obj, path)
        except RuntimeError as e:
            if "writ" not in str(e):  # "failed writing file", "file write failed"
                raise
            free = shutil.disk_usage(path.parent).free
            raise OSError(
                errno.ENOSPC if free < (64 << 20) else errno.EIO,
                f"could not write {path} ({free / 1e6:.0f} MB free on its device: {str(e).splitlines()[0]})",
                str(path),
            ) from e
    _fsync_file(path)


def rng_state() -> dict[str, Any]:
    """Every random generator training touches, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointPaths:
    directory: Path
    step: int

    @property
    def adapter(self) -> Path:
        return self.directory / "adapter"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointPaths]:
    """Complete checkpoints (final name and trainer_state.json present), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / STATE_NAME).is_file():
            found.append(CheckpointPaths(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output_dir: str | os.PathLike) -> CheckpointPaths | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def clean_temp_dirs(output_dir: str | os.PathLike) -> int:
    """Remove half-written checkpoint directories left by a killed run; returns how many."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return 0
    n = 0
    for child in root.iterdir():
        if child.name.startswith(".tmp-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            n += 1
    return n


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    extra_rng: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically (temp dir, fsync, rename) and prune to the newest ``keep_last``.

    extra_rng: more generator states to keep in rng.pt (e.g. the CUDA-graph step's dropout streams).
    """
    from minilora.lora import save_adapter

    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step:06d}-", dir=root))
    try:
        save_adapter(model, tmp / "adapter")
        for name, obj in (
            ("optimizer.pt", optimizer.state_dict()),
            ("scheduler.pt", scheduler.state_dict()),
            ("rng.pt", {**rng_state(), **(extra_rng or {})}),
        ):
            _torch_save(obj, tmp / name)
        state_path = tmp / STATE_NAME
        state_path.write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n", encoding="utf-8")
        _fsync_file(state_path)  # written last: its presence marks the checkpoint complete
        fsync_dir(tmp / "adapter")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): swap the old one out
            old = root / f".tmp-old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old_ckpt in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old_ckpt.directory, ignore_errors=True)
    return final


def load_checkpoint_state(ckpt: CheckpointPaths) -> dict[str, Any]:
    """The trainer state, optimizer, scheduler and RNG states of a checkpoint (the adapter is read apart)."""
    d = ckpt.directory
    path = d / STATE_NAME
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable trainer state ({e}); resume from another checkpoint") from e
    out: dict[str, Any] = {"trainer_state": state}
    for key, name in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt"), ("rng", "rng.pt")):
        path = d / name
        try:
            out[key] = torch.load(path, weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused an object: never unpickle it
            raise CheckpointError(
                f"{path}: refused to unpickle it (it holds objects other than tensors and plain containers, "
                f"which could run code: {str(e).splitlines()[0]}); minilora did not write this file"
            ) from e
        except (OSError, EOFError, RuntimeError) as e:  # truncated or corrupted zip
            raise CheckpointError(
                f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): truncated or "
                f"corrupted; delete {d} to resume from the checkpoint before it"
            ) from e
    return out


def load_adapter_weights_into(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Copy a saved adapter's tensors into the model's existing LoRA layers (same keys, same shapes)."""
    from minilora.lora import adapter_state_dict
    from minilora.lora.peft_io import read_adapter_tensors

    path = adapter_dir / "adapter_model.safetensors"
    try:
        saved = read_adapter_tensors(path)  # readable, floating point, finite
    except AdapterError as e:
        raise CheckpointError(f"resume checkpoint {adapter_dir.parent}: {e}") from e
    current = adapter_state_dict(model)
    if set(saved) != set(current):
        missing = sorted(set(current) - set(saved))[:3]
        extra = sorted(set(saved) - set(current))[:3]
        raise ValueError(
            f"{path} does not match the model's adapter (missing {missing}, unexpected {extra}); resume with "
            "the same LoRA settings as the interrupted run"
        )
    with torch.no_grad():
        for key, tensor in current.items():
            if tensor.shape != saved[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(saved[key].shape)}, model {tuple(tensor.shape)}")
            tensor.copy_(saved[key])
