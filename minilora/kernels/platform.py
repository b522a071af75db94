"""What the machine offers the kernels (Triton importable or not, its CPU interpreter, the device to launch on),
and what each op ran last.

Facts only, no choice: the door (dispatch.py) reads them to decide, the Triton modules to launch and to record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

# Whether triton can be imported: looked up once, at import (find_spec does not import it). A plain
# constant rather than a lazy or functools.cache'd lookup: torch.compile reads it without tracing into
# importlib (a lookup first made inside a compiled region was a graph break, benchmarks/gpu/NOTES.md).
_triton: bool = importlib.util.find_spec("triton") is not None
_last: dict[str, str] = {}  # op -> the implementation its last call ran (dispatch.last_implementation)


def record(op: str, name: str) -> str:
    """Note that a call of `op` ran `name` (not while torch.compile traces: a trace is not a call); returns name."""
    if not torch.compiler.is_compiling():
        _last[op] = name
    return name


def triton_available() -> bool:
    """Whether `import triton` would succeed (checked once, at import, without importing it)."""
    return _triton


def triton_interpreted() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels, but not their inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """`with launch_device(x):` around a Triton launch: Triton launches on the *current* CUDA device, so a tensor
    on another GPU needs its own made current. A no-op for CPU tensors (the Triton interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
