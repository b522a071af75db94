"""Reusable buffers for the weight a quantized layer dequantizes for one matmul and drops straight after.

`Linear4bit` rebuilds its float weight in every forward and again in the backward (dispatch.linear_4bit). Into a new
tensor, that costs more than the dequantize loop itself on CPU: the operating system maps the tensor's pages
at their first write (page faults), ~9 ms of ~15 ms for a 4096x4096 bfloat16 weight on this project's 2-core
machine, and a large tensor's memory goes back to the system when it is freed, so the next call pays again.
Here each thread keeps one buffer per (size, dtype, device) and hands it out again: the matmul reads it, and
the next layer of the same size writes over it.

The contract of `scratch(...)`: the buffer is valid until the next `scratch` call for the same size, dtype
and device on the same thread. The layers use it for exactly one matmul.

When it applies (`applies`): CPU tensors of at least MIN_BYTES, outside torch.compile traces. PyTorch's CUDA
allocator already caches freed blocks. Smaller CPU tensors come back from malloc's free lists without new page
faults: glibc serves a block freed below its mmap threshold (which adapts upwards to 32 MiB) from the memory it
already holds; only larger tensors are fresh mappings at every call. Keeping small buffers would gain ~10% on the
dequantize and changed how glibc laid out a SmolLM2 training step's memory: +150 MB of peak RSS with the same
live tensors.

At most MAX_BUFFERS buffers per thread are kept (least recently used dropped first); `release()` drops this
thread's buffers, `held_bytes()` says what they hold. For a Llama-3.1-8B-shaped model in bfloat16 that is two
sizes (4096x4096 and 14336x4096), 151 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

MAX_BUFFERS = 8
MIN_BYTES = 16 << 20
_local = threading.local()


def _buffers() -> OrderedDict[tuple[int, torch.dtype, torch.device], torch.Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers = OrderedDict()
    return _local.buffers


def applies(device: torch.device, nbytes: int) -> bool:
    """Whether a weight of `nbytes` dequantized for a matmul on `device` goes through a reused buffer (not
    inside a torch.compile trace, where the compiler plans the memory)."""
    return device.type == "cpu" and nbytes >= MIN_BYTES and not torch.compiler.is_compiling()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's buffer of `numel` elements of dtype on device (flat, contiguous), contents undefined."""
    buffers = _buffers()
    key = (numel, dtype, torch.device(device))
    buffer = buffers.pop(key, None)
    if buffer is None:
        buffer = torch.empty(numel, dtype=dtype, device=device)
    buffers[key] = buffer  # most recently used last
    while len(buffers) > MAX_BUFFERS:
        buffers.popitem(last=False)
    return buffer


def release() -> None:
    """Drop this thread's buffers (their memory goes back to the allocator)."""
    _buffers().clear()


def held_bytes() -> int:
    """Bytes this thread's buffers hold."""
    return sum(b.numel() * b.element_size() for b in _buffers().values())
