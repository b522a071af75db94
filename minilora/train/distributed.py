"""Training on several processes through torch.distributed: DDP over the adapter, or FSDP2 of a QLoRA model.

One object, passed to ``minilora.train.loop.train(distributed=...)``, holds everything the loop needs to
know about the other ranks; with none the loop runs alone (:class:`Single`, every hook a no-op):

    wrap(model, loss)   the function the loop calls for a micro-batch's (loss sum, target count)
    shard(batch)        this rank's rows of the global micro-batch (rows rank, rank + W, ...)
    no_sync(last)       skip the gradient all-reduce on every micro-batch but the last
    reduce(x)           a float summed over the ranks (the step's loss for the log)
    on_main(fn)         run fn on rank 0 only (files, the run directory), its error raised on every rank
    saving(model, opt)  the full adapter and optimizer state, gathered, for rank 0 to write
    restore(...)        a checkpoint (written by any number of ranks) loaded into this rank's shards

Exactness (the tests compare with one process): every rank draws the same global batch from the same
DataOrder (same seed) and keeps its rows, so the data position in a checkpoint means the same thing on
any world size whose ranks divide the batch. The step's loss is sum(token losses) / N with N the target
tokens of the whole global step, which every rank counts from the global batch without communicating;
gradients are then SUMMED over ranks (not averaged), so they equal the single-process gradient.

DDP (:class:`DDP`): the 4-bit base is replicated (its packed uint8 buffers are broadcast from rank 0
once, when DDP is built, never again: ``broadcast_buffers=False``); only the adapter has gradients.

FSDP2 (:class:`FSDP`, ``torch.distributed.fsdp.fully_shard``, one unit per decoder layer plus the root):
FSDP shards parameters only, and its mixed precision casts each parameter to ``param_dtype`` by value,
which would turn packed bytes into numbers. So every ``Linear4bit`` becomes a :class:`FlatLinear4bit`
whose packed codes AND quant state (absmax, code, nested absmax, nested code, offset) are the bytes of
one flat, frozen parameter stored in a float dtype (``quant_storage``, as bitsandbytes' Params4bit does):
FSDP shards, all-gathers and "casts" it (a no-op when ``quant_storage`` is ``param_dtype``) like any other
weight, and the forward reads the bytes back. ::

    Linear4bit buffers:  weight u8 (n/2,1) | absmax u8 | quant_map f32 | nested_absmax f32 | ... | offset
    FlatLinear4bit:      quant_data = those bytes, each piece 16-byte aligned, viewed as quant_storage (1-D)
                         rank 0 holds quant_data[: k], rank 1 quant_data[k :], ...  (Shard(0))

A base too large for one rank loads through ``FSDP.load`` (:func:`load_sharded`) instead of from_pretrained:
built on meta, sharded, then each rank fills its own shards from the safetensors one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from minilora.train.data import IGNORE_INDEX, Batch
from minilora.train.flat_4bit import dtensor_type, flatten_4bit, shard_like
from minilora.train.sharded_load import load_sharded

T = TypeVar("T")
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


# ---------------------------------------------------------------------------------------------- one process
class Single:
    """No other ranks: the hooks of the loop as the single-process loop has them."""

    rank, world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, cuda_graph: bool, cache_base_weights: bool) -> None:
        """Refuse settings this strategy cannot run (nothing to refuse alone)."""

    def wrap(self, model: nn.Module, loss: LossFn) -> Callable[[Batch], tuple[torch.Tensor, int]]:
        return lambda batch: loss(model, batch)

    def shard(self, batch: Batch) -> Batch:
        return batch

    def no_sync(self, accumulating: bool) -> Any:
        return nullcontext()

    def reduce(self, value: float) -> float:
        return value

    def on_main(self, fn: Callable[[], T]) -> T | None:
        return fn()

    @contextmanager
    def saving(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[nn.Module, Any]]:
        yield model, optimizer

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, adapter_dir: Any, optim_state: dict) -> None:
        from minilora.train.checkpoint import load_adapter_weights_into

        load_adapter_weights_into(model, adapter_dir)
        optimizer.load_state_dict(optim_state)


# ---------------------------------------------------------------------------------------------- shared
class _LossModule(nn.Module):
    """The model with the loss as its forward, so DDP's and FSDP's forward hooks see every call."""

    def __init__(self, model: nn.Module, loss: LossFn | None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss  # None until FSDP.wrap (a model sharded by FSDP.load)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        if self.loss is None:
            raise RuntimeError("the model sharded by FSDP.load runs through train(..., distributed=that FSDP)")
        return self.loss(self.model, batch)


class _Ranks(Single):
    """What DDP and FSDP share: the row split, the sums, rank 0's files."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__}: torch.distributed is not initialised; call "
                "minilora.train.distributed.init_from_env() (under torchrun) or init_process_group first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def check(self, cuda_graph: bool, cache_base_weights: bool) -> None:
        if cuda_graph:
            raise ValueError(
                f"{type(self).__name__}: the CUDA-graph step has no gradient communication; set cuda_graph=False "
                "(the eager loop runs under torch.distributed)"
            )

    def shard(self, batch: Batch) -> Batch:
        """Rows rank, rank + W, ... of the global batch (DistributedSampler's split within each batch).

        A rank left without a row (a short last batch) gets row 0 with every label -100: it takes part in
        the collectives and adds nothing to the loss or the gradient.
        """
        rows = torch.arange(batch.input_ids.shape[0])[self.rank :: self.world_size]
        labels = None
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long)
            labels = torch.full_like(batch.labels[rows], IGNORE_INDEX)
        pos = None if batch.position_ids is None else batch.position_ids[rows]
        return Batch(
            batch.input_ids[rows], batch.labels[rows] if labels is None else labels, batch.attention_mask[rows], pos
        )

    def reduce(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, group=self.group)
        return float(t[0])

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """fn() on rank 0; its exception (if any) is raised on every rank, so none waits forever."""
        error: list[Any] = [None]
        value = None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:  # re-raised after the other ranks learned of it
                error = [f"{type(e).__name__}: {e}"]
                dist.broadcast_object_list(error, src=0, group=self.group)
                raise
        dist.broadcast_object_list(error, src=0, group=self.group)
        if error[0] is not None:
            raise RuntimeError(f"rank 0 failed: {error[0]}")
        return value

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _allreduce_sum(group, bucket):  # noqa: ANN001, ANN202 (DDP checks the real annotation; ours are strings)
    """DDP communication hook (ProcessGroup | None, GradBucket) -> Future[Tensor]: gradients summed over
    ranks, not averaged (see the module docstring)."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# ---------------------------------------------------------------------------------------------- DDP
class DDP(_Ranks):
    """Data parallel over the adapter; the frozen (4-bit) base replicated on every rank."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None

    def wrap(self, model: nn.Module, loss: LossFn) -> Callable[[Batch], tuple[torch.Tensor, int]]:
        device = next(model.parameters()).device
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            _LossModule(model, loss),
            device_ids=[device] if device.type == "cuda" else None,
            process_group=self.group,
            broadcast_buffers=False,  # the base's buffers (packed weights) never change: sent once, at init
        )
        self.ddp.register_comm_hook(self.group, _allreduce_sum)
        return self.ddp

    def no_sync(self, accumulating: bool) -> Any:
        assert self.ddp is not None, "DDP.no_sync before wrap()"
        return self.ddp.no_sync() if accumulating else nullcontext()

    @contextmanager
    def saving(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[nn.Module, Any]]:
        yield model, optimizer  # every rank holds the full adapter and optimizer: rank 0 writes them
        self.barrier()


# ---------------------------------------------------------------------------------------------- FSDP2
class FSDP(_Ranks):
    """FSDP2 (``fully_shard``): parameters, flat 4-bit weights included, sharded over the ranks.

    param_dtype / reduce_dtype: FSDP's MixedPrecisionPolicy (None: the parameters' own dtypes); the 4-bit
    bytes are stored in ``param_dtype`` (else float32) so that its cast leaves them alone.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
        reshard_after_forward: bool = True,
    ) -> None:
        super().__init__(group)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        self.root: _LossModule | None = None
        self.meshes: dict[str, Any] = {}

    def check(self, cuda_graph: bool, cache_base_weights: bool) -> None:
        super().check(cuda_graph, cache_base_weights)
        if cache_base_weights:
            raise ValueError("FSDP: cache_base_weights would dequantize the whole base on every rank; leave it off")

    def _mesh(self, device: torch.device) -> Any:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if device.type not in self.meshes:  # one mesh per device type, shared by every unit
            if self.group is None:
                self.meshes[device.type] = init_device_mesh(device.type, (self.world_size,))
            else:
                self.meshes[device.type] = DeviceMesh.from_group(self.group, device.type)
        return self.meshes[device.type]

    def shard_model(self, model: nn.Module, device: torch.device, loss: LossFn | None = None) -> nn.Module:
        """Flatten the 4-bit layers, ``fully_shard`` each decoder layer, then the root (the model with the
        loss as its forward: embeddings, final norm, head); returns the root. The parameters may still be on
        the meta device (FSDP.load, which passes no loss yet: wrap sets it)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        mesh = self._mesh(device)
        flatten_4bit(model, self.param_dtype or torch.float32)
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        layers = getattr(getattr(model, "model", None), "layers", None)
        for layer in layers if layers is not None else []:  # one unit per decoder layer: gathered one at a time
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        root = _LossModule(model, loss)
        fully_shard(root, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
        for unit in root.modules():  # summed over ranks (see the module docstring); each unit has its own
            if isinstance(unit, FSDPModule):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        self.root = root
        return root

    def load(self, path_or_id: Any, quantize: str | None = "nf4", **kwargs: Any) -> nn.Module:
        """A checkpoint too large for one rank, loaded straight into this rank's shards: see
        :func:`load_sharded` for the steps and ``kwargs`` (prepare=, dtype=, device=, on_tensor=, ...)."""
        return load_sharded(self, path_or_id, quantize, **kwargs)

    def wrap(self, model: nn.Module, loss: LossFn) -> Callable[[Batch], tuple[torch.Tensor, int]]:
        if self.root is not None and self.root.model is model:  # sharded by FSDP.load: only the loss is new
            self.root.loss = loss
            return self.root
        return self.shard_model(model, next(model.parameters()).device, loss)

    def no_sync(self, accumulating: bool) -> Any:
        assert self.root is not None, "FSDP.no_sync before wrap()"
        return _fsdp_sync(self.root, not accumulating)

    @contextmanager
    def saving(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[nn.Module, Any]]:
        """The model with its trainable parameters gathered in full (float32 masters, not the compute
        dtype), the base left sharded; an optimizer stand-in whose state_dict() holds full tensors."""
        with _full_trainable(model):
            state = optimizer.state_dict()
            state["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()}
            yield model, _StateDict(state)
        self.barrier()

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, adapter_dir: Any, optim_state: dict) -> None:
        """The full adapter read into full copies, then each rank keeps its shards; the same for AdamW's state."""
        from minilora.train.checkpoint import load_adapter_weights_into

        with _full_trainable(model, write_back=True):
            load_adapter_weights_into(model, adapter_dir)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = dict(optim_state)
        state["state"] = {
            i: {k: shard_like(v, params[int(i)]) for k, v in s.items()} for i, s in optim_state["state"].items()
        }
        optimizer.load_state_dict(state)


class _StateDict:
    """What save_checkpoint asks of an optimizer: its state_dict()."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, dtensor_type()) else t


@contextmanager
def _fsdp_sync(root: Any, sync: bool) -> Iterator[None]:
    root.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextmanager
def _full_trainable(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Swap each sharded trainable parameter for a full plain copy (a collective); restore on exit, copying
    the full values back into this rank's shards when ``write_back``."""
    DTensor = dtensor_type()
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and p.requires_grad:
                swapped.append((module, name, p))
                module._parameters[name] = nn.Parameter(p.full_tensor().detach().clone())
    try:
        yield
    finally:
        for module, name, p in swapped:
            if write_back:
                with torch.no_grad():
                    p.to_local().copy_(shard_like(module._parameters[name].detach(), p).to_local())
            module._parameters[name] = p


# ---------------------------------------------------------------------------------------------- torchrun
def init_from_env(strategy: str = "ddp", **fsdp_kwargs: Any) -> Single:
    """The strategy for this process: Single outside torchrun (no RANK in the environment), else the
    process group from env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; NCCL on CUDA, gloo on CPU, each
    rank on cuda:LOCAL_RANK) and DDP or FSDP over it (world size 1 included)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"distributed strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if "RANK" not in os.environ:
        return Single()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", timeout=timedelta(minutes=30))
    return FSDP(**fsdp_kwargs) if strategy == "fsdp" else DDP()
