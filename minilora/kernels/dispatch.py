"""Which path runs: the plain-PyTorch reference (minilora.quant) or the Triton kernels of this package.

The fast path is taken only when all of these hold:
  - the tensor lives on a CUDA device,
  - Triton can be imported (it ships with CUDA builds of PyTorch; it is not a runtime dependency),
  - the reference is not forced, by `use_reference(True)` or the environment variable MINILORA_REFERENCE=1.

Everywhere else (CPU, MPS, no Triton) the reference in minilora.quant runs, so the library reads and
behaves the same without a GPU. This module imports neither Triton nor minilora.quant, so minilora.quant
can import it without a cycle.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

_forced: bool | None = None  # set by use_reference(); None means "read the environment"
# Whether triton can be imported: looked up once, at import (find_spec does not import it). A plain
# constant rather than a lazy or functools.cache'd lookup: torch.compile reads it without tracing into
# importlib (a lookup first made inside a compiled region was a graph break, benchmarks/gpu/NOTES.md).
_triton: bool = importlib.util.find_spec("triton") is not None


def _env_forces_reference() -> bool:
    return os.environ.get("MINILORA_REFERENCE", "").strip().lower() in ("1", "true", "yes", "on")


def use_reference(force: bool = True) -> None:
    """Force the plain-PyTorch reference everywhere (force=True), or let dispatch choose again (False).

    The call overrides MINILORA_REFERENCE for the rest of the process.
    """
    global _forced
    _forced = bool(force)


def reference_forced() -> bool:
    """True when the reference is forced, by `use_reference(True)` or MINILORA_REFERENCE=1."""
    return _env_forces_reference() if _forced is None else _forced


@contextlib.contextmanager
def reference_mode(force: bool = True) -> Iterator[None]:
    """`with reference_mode():` runs its body on the reference path, then restores the previous choice."""
    global _forced
    previous = _forced
    _forced = bool(force)
    try:
        yield
    finally:
        _forced = previous


def triton_available() -> bool:
    """Whether `import triton` would succeed (checked once, at import, without importing it)."""
    return _triton


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """`with launch_device(x):` around a Triton launch: Triton launches on the *current* CUDA device, so a tensor
    on another GPU needs its own made current. A no-op for CPU tensors (the Triton interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def use_fast_path(x: torch.Tensor) -> bool:
    """True when the Triton kernels should handle tensor `x`."""
    return x.is_cuda and not reference_forced() and triton_available()
