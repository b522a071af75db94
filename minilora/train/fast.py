"""Which training path runs, and the pieces of the fast one: compiled blocks, one CUDA graph, packed rows.

The reference path is the eager loop of minilora.train.loop: one Python call per kernel, batches padded to
their longest example. On a GPU that loop is bound by the host (benchmarks/gpu/NOTES.md), so on CUDA
``train()`` takes, by default, the fastest path that computes the same loss:

    compiled blocks   each decoder layer through torch.compile (fused norms, rotary, SwiGLU, dropout)
    CUDA graph        the whole optimizer step recorded once and replayed (minilora.train.cuda_graph)
    packed rows       examples concatenated into rows of ``pack_length`` tokens (first-fit decreasing,
                      each example whole), positions restarting at 0 and attention confined to each
                      example (block-diagonal causal mask), so rows hold few pad tokens and every step
                      has one static shape: one graph, captured once
    host embedding    a frozen, untied input embedding waits in pinned host memory, its rows read there by a
                      kernel (minilora.train.offload.embedding_on_host): 1.05 GB less on the card at 8B

Packing changes what one step holds (``batch_size`` rows, each of one or more examples) but not what
the loss is: the mean cross-entropy over the step's completion tokens, every example seeing only itself.
:func:`choose_path` decides; its ``describe()`` is the one line the loop logs, naming what was refused
and why. ``TrainConfig(fast=False)`` (``minilora finetune --no-fast``) keeps the reference path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from minilora.train.data import IGNORE_INDEX, Example, PackedExample

PACK_MULTIPLE = 64  # pack_length "auto": the longest example rounded up to this many tokens


@dataclass
class TrainPath:
    """What the loop will do, and why a faster piece was refused."""

    compile_blocks: bool = False
    cuda_graph: bool = False
    pack_length: int | None = None  # None: batches of whole examples, padded to their longest
    host_embedding: bool = False
    refused: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = []
        if self.compile_blocks:
            parts.append("compiled blocks")
        if self.cuda_graph:
            parts.append("whole step as one CUDA graph")
        if self.host_embedding:
            parts.append("input embedding in host memory")
        if self.pack_length:
            parts.append(f"packed rows of {self.pack_length} tokens")
        return " + ".join(parts) if parts else "eager (reference)"

    def describe(self) -> str:
        line = f"training path: {self.name}"
        if self.refused:
            line += " (not faster: " + "; ".join(self.refused) + ")"
        if self.compile_blocks or self.cuda_graph:
            line += "; fast=False / --no-fast for the eager reference loop"
        return line


def _is_decoder(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") and hasattr(getattr(model, "model", None), "layers")


def choose_path(
    model: nn.Module, examples: Sequence[Example], config, distributed: bool = False
) -> TrainPath:  # config: TrainConfig
    """The fastest exact path for this model, device and data; explicit settings in ``config`` win."""
    from minilora.train.offload import host_embedding_refusal

    device = next(model.parameters()).device
    path = TrainPath()
    wants = {"compile_blocks": config.compile_blocks, "cuda_graph": config.cuda_graph, "packing": config.packing,
             "host_embedding": config.host_embedding}  # fmt: skip
    auto = config.fast
    if not config.fast:
        path.refused.append("fast=False")
    elif device.type != "cuda":
        path.refused.append(f"the fast path needs CUDA, the model is on {device.type}")
        auto = False
    elif not _is_decoder(model):
        path.refused.append(f"{type(model).__name__} is not a minilora decoder (.model.layers, .lm_head)")
        auto = False
    if wants["cuda_graph"] and device.type != "cuda":
        raise ValueError(f"TrainConfig.cuda_graph needs the model on a CUDA device, it is on {device}")
    path.compile_blocks = auto if wants["compile_blocks"] is None else wants["compile_blocks"]
    path.cuda_graph = auto if wants["cuda_graph"] is None else wants["cuda_graph"]
    if path.cuda_graph and wants["cuda_graph"] is None and config.offload_checkpoints:
        path.cuda_graph = False
        path.refused.append("no CUDA graph: offload_checkpoints copies to the host in the backward")
    packing = auto if wants["packing"] is None else wants["packing"]
    if packing and examples and isinstance(examples[0], PackedExample):
        packing = False  # the caller packed them already
    if packing:
        longest = max(len(e.input_ids) for e in examples)
        path.pack_length = config.pack_length or -(-longest // PACK_MULTIPLE) * PACK_MULTIPLE
    if path.compile_blocks and not _is_decoder(model):
        raise ValueError("TrainConfig.compile_blocks needs a minilora decoder (.model.layers)")
    if wants["host_embedding"] or (auto and wants["host_embedding"] is None):
        why = host_embedding_refusal(model)
        if why is None and device.type != "cuda":
            why = f"host memory is the model's own on {device.type}"
        if why is None and distributed:
            why = "distributed ranks hold their embedding as the wrapper placed it"
        if why is not None and wants["host_embedding"]:
            raise ValueError(f"TrainConfig.host_embedding: {why}")
        path.host_embedding = why is None
        if why is not None:
            path.refused.append(f"input embedding stays on the card: {why}")
    return path


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (static shapes: one graph per distinct input)."""
    import torch._dynamo as dynamo

    # Every layer is the same code with other parameters: one compiled graph serves them all, but each
    # (requires_grad of the input, shape) is a guard variant; leave room for them.
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        layer.compile(dynamic=False)


def pack_first_fit(examples: Sequence[Example], pack_length: int) -> list[PackedExample]:
    """Pack whole examples into rows of at most ``pack_length`` tokens, first-fit decreasing.

    Longest first, each into the first row with room (a deterministic order: ties keep input order).
    Within a row, positions restart at 0 at every example and each example's first label is -100, so no
    example is trained to predict the start of the next one; the attention mask built from these
    positions keeps examples apart (minilora.models.llama.build_attention_mask).
    """
    too_long = [i for i, e in enumerate(examples) if len(e.input_ids) > pack_length]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"example {i} has {len(examples[i].input_ids)} tokens, more than pack_length={pack_length} "
            f"({len(too_long)} such examples); raise pack_length or cut the examples"
        )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    packed = []
    for members in rows:
        members.sort()  # examples in input order within the row
        ids, labels, positions = [], [], []
        for i in members:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + list(e.labels[1:])
            positions += list(range(len(e.input_ids)))
        packed.append(PackedExample(ids, labels, positions))
    return packed


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which example each position of a packed row holds: a new one starts wherever the position is 0."""
    return (position_ids == 0).cumsum(-1)  # (..., T)
