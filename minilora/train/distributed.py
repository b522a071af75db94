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

from minilora.nn import Linear4bit
from minilora.train.data import IGNORE_INDEX, Batch

T = TypeVar("T")
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
ALIGN = 16  # bytes: every piece of a flat 4-bit weight starts aligned for any dtype view


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
class FlatLinear4bit(Linear4bit):
    """A Linear4bit whose packed codes and quant state are one flat parameter ``quant_data`` (see above).

    ``weight``, ``absmax``, ... are read back from the bytes on each access, so Linear4bit's forward,
    dequantize and quant_state run unchanged on the all-gathered parameter.
    """

    def __init__(self, linear: Linear4bit, quant_storage: torch.dtype) -> None:
        nn.Module.__init__(self)
        for name in ("out_features", "in_features", "blocksize", "quant_type", "weight_dtype", "compute_dtype"):
            setattr(self, name, getattr(linear, name))
        if hasattr(linear, "nested_blocksize"):
            self.nested_blocksize = linear.nested_blocksize
        chunks, self.layout, pos = [], {}, 0
        for name, t in linear.named_buffers(recurse=False):
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            self.layout[name] = (pos, raw.numel(), t.dtype, tuple(t.shape))
            pad = -raw.numel() % ALIGN
            chunks += [raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)]
            pos += raw.numel() + pad
        flat = torch.cat(chunks)  # pos bytes, a multiple of ALIGN, so of quant_storage's size
        self.quant_data = nn.Parameter(flat.view(quant_storage), requires_grad=False)
        self.bias = linear.bias

    def __getattr__(self, name: str) -> Any:
        layout = self.__dict__.get("layout")
        if layout is not None and name in layout:
            pos, n, dtype, shape = layout[name]
            raw = self.quant_data.view(torch.uint8)[pos : pos + n]
            if raw.storage_offset() % dtype.itemsize:  # an all-gather buffer at an odd offset: copy to view it
                raw = raw.clone()
            return raw.view(dtype).reshape(shape)
        return super().__getattr__(name)

    # the flat parameter is the state (sharded or not), not bitsandbytes' keys
    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict


def flatten_4bit(model: nn.Module, quant_storage: torch.dtype = torch.float32) -> int:
    """Swap every Linear4bit of ``model`` for a FlatLinear4bit (bit-identical outputs); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is Linear4bit]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FlatLinear4bit(module, quant_storage))
    return len(targets)


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


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
            i: {k: _like(v, params[int(i)]) for k, v in s.items()} for i, s in optim_state["state"].items()
        }
        optimizer.load_state_dict(state)


class _StateDict:
    """What save_checkpoint asks of an optimizer: its state_dict()."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _full(t: Any) -> Any:
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def _like(t: Any, param: torch.Tensor) -> Any:
    """A full tensor as the shard of ``param``'s layout (no communication: every rank read the file)."""
    if not (isinstance(param, _dtensor()) and torch.is_tensor(t) and t.shape == param.shape):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


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
    DTensor = _dtensor()
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
                    p.to_local().copy_(_like(module._parameters[name].detach(), p).to_local())
            module._parameters[name] = p


# ---------------------------------------------------------------------------------------------- FSDP2 loading
SHARDED_QUANTIZE = (None, "nf4", "fp4")
TensorHook = Callable[[nn.Module, str, torch.Tensor], None]


def load_sharded(
    strategy: FSDP,
    path_or_id: str | os.PathLike,
    quantize: str | None = "nf4",
    *,
    prepare: Callable[[nn.Module], Any] | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    revision: str | None = None,
    on_tensor: TensorHook | None = None,
) -> nn.Module:
    """The model of ``path_or_id`` (see from_pretrained's arguments), sharded by ``strategy`` as it loads.

    ``FSDP.load`` calls it; instead of from_pretrained + the sharding ``FSDP.wrap`` does, for a base that
    does not fit on one rank:

    1. the decoder is built on the meta device and every key and shape of the checkpoint is checked from the
       file headers (``minilora.loading``'s plan: a bad file is refused before any weight is read);
    2. each decoder projection becomes a :class:`FlatLinear4bit` of the right layout, still on meta (the
       layout is that of a zero weight of the same shape, quantized once per distinct shape);
    3. ``prepare(model)`` (e.g. ``lambda m: add_lora(m, ...)``) adds the adapter: its tensors are real and
       drawn from the same random numbers as on a loaded model (the bases look like CPU modules while it runs);
    4. ``fully_shard`` as ``FSDP.wrap`` applies it (one unit per decoder layer, then the rest), the meta
       parameters get empty local shards (FSDP's lazy init takes them), and then
    5. the safetensors are read one tensor at a time: a projection's float weight is quantized, flattened
       as FlatLinear4bit does and this rank keeps its slice; any other tensor gives its slice
       (``distribute_tensor(full, mesh, placements, src_data_rank=None)``: every rank reads the file, no
       communication). A rank never holds more than its shards plus one full tensor (and its 4-bit bytes).

    The result trains through ``train(..., distributed=strategy)`` exactly as the load-then-shard path does
    (the same units and shards; FSDP.wrap finds the root unit made and gives it the loss).

    prepare: called once on the meta model before sharding, to add the adapter (default or gaussian LoRA
        init; PiSSA / OLoRA / LoftQ and DoRA, which read the base weight, modules_to_save and trainable tokens,
        which copy it, are refused with a ValueError).
    on_tensor: called with (model, key, full tensor) for every full tensor read, while it is alive (tests
        measure a rank's peak with it).
    """
    from minilora.io.checkpoint import SOURCE_ATTR, CheckpointReader
    from minilora.io.hub import resolve_model_dir
    from minilora.loading import _plan, _read, _stored_quantization, quantize_read
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaForCausalLM

    if quantize not in SHARDED_QUANTIZE:
        raise ValueError(f"FSDP.load: quantize={quantize!r}; the sharded loader takes one of {SHARDED_QUANTIZE}")
    device = torch.device(device)
    directory = resolve_model_dir(path_or_id, revision=revision)
    config = ModelConfig.from_json(directory / "config.json")
    if _stored_quantization(config, directory) is not None:
        raise ValueError(
            f"{directory / 'config.json'}: FSDP.load reads float checkpoints; this one is already quantized "
            "(load it with from_pretrained and let FSDP.wrap shard it)"
        )
    storage = strategy.param_dtype or torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with CheckpointReader(directory) as ckpt:
        plan = _plan(model, ckpt, directory)
        templates: dict[tuple, Linear4bit] = {}
        placeholders: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, name, meta tensor) for prepare
        for name, (kind, names) in plan.items():
            module = model.get_submodule(name)
            for p in names:  # the dtype each tensor will have, still on meta
                t = getattr(module, p)
                want = dtype if dtype is not None else ckpt.dtype(f"{name}.{p}")
                setattr(module, p, nn.Parameter(torch.empty_like(t, dtype=want), requires_grad=want.is_floating_point))
            if kind != "quantize":
                continue
            if quantize is not None:
                weight = module.weight
                key = (tuple(weight.shape), weight.dtype)
                if key not in templates:  # the layout depends on the shape alone
                    zero = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
                    args = (zero, None, quantize, double_quant, blocksize, compute_dtype)
                    templates[key] = quantize_read(ckpt, name, *args)
                module = _meta_flat(templates[key], storage, module.bias)
                model.set_submodule(name, module)
            attr = "quant_data" if quantize is not None else "weight"
            meta = getattr(module, attr)
            placeholders.append((module, attr, meta))
            # while prepare runs the base holds a real empty tensor: LoRALinear puts its adapter on that device
            setattr(module, attr, nn.Parameter(meta.new_empty(0, device=device), requires_grad=meta.requires_grad))
        del templates
        model.tie_weights()
        if prepare is not None:
            try:
                prepare(model)
            except Exception as e:  # e.g. an init that reads the base weight, absent here
                raise ValueError(
                    f"FSDP.load: prepare() failed on the model before its weights are loaded ({type(e).__name__}: "
                    f"{e}); it may only add adapters that do not read the base weights"
                ) from e
            _check_adapter(model)
        for module, attr, meta in placeholders:
            setattr(module, attr, nn.Parameter(meta, requires_grad=getattr(module, attr).requires_grad))
        strategy.shard_model(model, device)
        _materialize(model, device)

        for name, (_, names) in plan.items():
            module = _base_of(model.get_submodule(name))
            for p in names:
                key = f"{name}.{p}"
                tensor = _read(ckpt, key, dtype, device)
                if on_tensor is not None:
                    on_tensor(model, key, tensor)
                if p == "weight" and isinstance(module, FlatLinear4bit):
                    linear = quantize_read(ckpt, name, tensor, None, quantize, double_quant, blocksize, compute_dtype)
                    flat = FlatLinear4bit(linear, storage)
                    del tensor, linear
                    if flat.layout != module.layout:  # pragma: no cover (a bug, not bad input)
                        raise AssertionError(f"{key}: the quantized layout differs from the planned one")
                    tensor, p = flat.quant_data, "quant_data"
                    del flat
                _fill(getattr(module, p), tensor, key)
                del tensor
    model.reset_rope(device)
    setattr(model, SOURCE_ATTR, directory)
    return model.eval()


def _meta_flat(template: Linear4bit, storage: torch.dtype, bias: nn.Parameter | None) -> Any:
    """A FlatLinear4bit of ``template``'s layout with its bytes (and bias) on the meta device."""
    flat = FlatLinear4bit(template, storage)
    flat.quant_data = nn.Parameter(torch.empty_like(flat.quant_data, device="meta"), requires_grad=False)
    flat.bias = bias
    return flat


def _base_of(module: nn.Module) -> nn.Module:
    from minilora.lora.layer import LoRALinear

    return module.base_layer if isinstance(module, LoRALinear) else module


def _check_adapter(model: nn.Module) -> None:
    """The adapter of ``prepare`` must not copy the (absent) base weights (an init or DoRA that reads them
    already failed in prepare, on the empty stand-in tensors)."""
    for name, config in getattr(model, "lora_configs", {}).items():
        problems = [
            f"modules_to_save={config.modules_to_save!r}" if config.modules_to_save else "",
            f"trainable_token_indices={config.trainable_token_indices!r}" if config.trainable_token_indices else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(
                f"FSDP.load: adapter {name!r} has {', '.join(problems)}, which copies base weights that are not "
                "loaded yet; add LoRA layers only, or load with from_pretrained and let FSDP.wrap shard the model"
            )
    left = [n for n, p in model.named_parameters() if p.requires_grad and p.is_meta]
    if left:
        raise ValueError(f"FSDP.load: prepare() left trainable tensors on the meta device: {left[:3]}")


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Empty local storage for every meta parameter (tied ones stay tied); FSDP's lazy init takes them."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]


@torch.no_grad()
def _fill(param: torch.Tensor, full: torch.Tensor, key: str) -> None:
    """This rank's part of ``full`` into ``param`` (a sharded DTensor, or a plain tensor)."""
    if tuple(full.shape) != tuple(param.shape):  # pragma: no cover (the plan checked every shape)
        raise AssertionError(f"{key}: shape {list(full.shape)} for a parameter of shape {list(param.shape)}")
    if isinstance(param, _dtensor()):
        param.to_local().copy_(_like(full, param).to_local())
    else:
        param.copy_(full)


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
