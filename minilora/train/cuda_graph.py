"""A whole training step (forward, backward, clipping, optimizer) recorded once as a CUDA graph and replayed.

Why: on the notes' small batches a QLoRA step is bound by the host, not the GPU. One step of an 8B model
with gradient checkpointing launches some 10,000 kernels (32 layers x 3 passes x dequantize, matmul, LoRA,
norms, rotary, attention, AdamW), and Python plus the launches take longer than the GPU needs to run them
(benchmarks/gpu/NOTES.md: ~0.45 s of host time against ~0.1 s of GPU work at 4 x 182 tokens). A CUDA
graph records the launches once; a replay is a single launch, and the host is free at once.

What capture needs, and how this module meets it:

- Fixed shapes and addresses. Inputs are copied into static tensors before each replay; one graph per
  input shape (each with its own memory pool, so replays in any order are safe).
- No host synchronisation inside the step. The loss stays a device tensor (read it when you need it);
  the optimizer must keep its step count on the device (``capturable=True``); the learning rate becomes a
  device tensor, changed in place with :meth:`CUDAGraphStep.set_lr` (a scheduler that assigns a float to
  ``param_group["lr"]`` would be ignored by the graph, so it is detected and refused).
- Randomness. Dropout draws from Philox generator states registered with the graph; each replay advances
  them, so every step gets fresh masks. Gradient checkpointing must then replay in the backward the same
  masks that the forward drew. ``torch.utils.checkpoint`` does that by saving and restoring the
  generator with ``get_rng_state``, which capture forbids. :class:`GraphSafeCheckpoint` instead gives each
  checkpointed layer two generator states with the same seed, one consumed by the forward and one by the
  recompute: they draw the same numbers and advance in lockstep, replay after replay.
- Warm-up. Capture needs every lazy thing done first (Triton compiles, cuBLAS workspaces, optimizer
  state); a few eager steps run before capture on the first batch, after which the trainable parameters,
  the optimizer state and the random streams are put back: the warm-up leaves no trace, and the replays
  compute what the same steps run eagerly (with the same GraphSafeCheckpoint seed) compute.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

__all__ = ["CUDAGraphStep", "GraphSafeCheckpoint"]

logger = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]
# graph, static inputs, static loss, static gradient norm (None without clipping)
_Captured = tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor, torch.Tensor | None]


class GraphSafeCheckpoint:
    """Gradient checkpointing whose dropout masks survive CUDA-graph capture and replay.

    Call it as ``ckpt(layer, *inputs)`` in place of ``torch.utils.checkpoint.checkpoint(layer, *inputs)``;
    :class:`~minilora.models.llama.LlamaModel` uses it when it is set as ``model.checkpoint_fn``.

    Each layer (a *site*, keyed by the module) owns a pair of states cloned from the device's default
    generator and seeded alike: the forward draws from the first, the recompute in the backward from the
    second. They stay equal as long as every forward is followed by exactly one recompute, which is what a
    training step does (early stopping of the recompute is turned off so that it draws as much as the
    forward). Sites are created on first use; once the states are registered with a graph
    (:meth:`register`), a new site is an error rather than a silently unregistered generator.
    """

    def __init__(self, device: torch.device | str, seed: int = 0) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"GraphSafeCheckpoint is for CUDA devices, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.generator = torch.cuda.default_generators[index]
        self._seeds = torch.Generator().manual_seed(seed)  # where each new site's seed comes from
        self.sites: dict[int, tuple[nn.Module, torch.Generator, torch.Generator]] = {}
        self.frozen = False

    def _site(self, module: nn.Module) -> tuple[torch.Generator, torch.Generator]:
        key = id(module)
        if key not in self.sites:
            if self.frozen:
                raise RuntimeError(
                    f"GraphSafeCheckpoint: a new checkpointed module ({type(module).__name__}) appeared after the "
                    "generator states were registered with a CUDA graph; its dropout would not be replayed"
                )
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            forward = self.generator.clone_state().manual_seed(seed)
            recompute = self.generator.clone_state().manual_seed(seed)
            self.sites[key] = (module, forward, recompute)
        _, forward, recompute = self.sites[key]
        return forward, recompute

    def get_state(self) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Where every stream stands (the site-seed generator and each site's two states); host tensors."""
        return self._seeds.get_state(), {k: (f.get_state(), r.get_state()) for k, (_, f, r) in self.sites.items()}

    def set_state(self, state: tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Go back to a :meth:`get_state`; sites created since are dropped (they are made again, alike)."""
        seeds, sites = state
        if self.frozen and set(sites) != set(self.sites):
            raise RuntimeError("GraphSafeCheckpoint: cannot drop sites registered with a CUDA graph")
        self._seeds.set_state(seeds)
        self.sites = {k: v for k, v in self.sites.items() if k in sites}
        for key, (forward, recompute) in sites.items():
            self.sites[key][1].set_state(forward)
            self.sites[key][2].set_state(recompute)

    def register(self, graph: torch.cuda.CUDAGraph) -> None:
        """Register every site's states with `graph` (before its capture), and allow no new sites."""
        for _, forward, recompute in self.sites.values():
            graph.register_generator_state(forward)
            graph.register_generator_state(recompute)
        self.frozen = True

    def run_forward(self, module: nn.Module, *inputs: object) -> torch.Tensor:
        """Run `module` as the checkpointed forward would, without checkpointing (for tests and comparison)."""
        forward, _ = self._site(module)
        return self._with_state(forward, module, inputs)

    def _with_state(self, state: torch.Generator, module: Callable[..., torch.Tensor], inputs: Sequence) -> Any:
        previous = self.generator.graphsafe_get_state()
        self.generator.graphsafe_set_state(state)
        try:
            return module(*inputs)
        finally:
            self.generator.graphsafe_set_state(previous)

    def __call__(self, module: nn.Module, *inputs: object) -> torch.Tensor:
        forward, recompute = self._site(module)
        calls = 0

        def run(*args: object) -> torch.Tensor:
            nonlocal calls
            state = forward if calls == 0 else recompute
            calls += 1
            return self._with_state(state, module, args)

        with set_checkpoint_early_stop(False):
            return checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=False)


class CUDAGraphStep:
    """``step(*inputs) -> loss``: one optimizer step, captured as a CUDA graph on first sight of a shape.

    Args:
        model: on a CUDA device, in training mode. If it has ``model.model.checkpoint_fn`` (minilora's
            Llama) and gradient checkpointing is on, a :class:`GraphSafeCheckpoint` is installed there.
        optimizer: over the trainable parameters, built with ``capturable=True`` (e.g.
            ``torch.optim.AdamW(params, lr=1e-4, capturable=True)``).
        loss_fn: ``loss_fn(model, *inputs) -> scalar loss``; must not synchronise with the host (no
            ``.item()``, no data-dependent shapes).
        max_grad_norm: clip the global gradient norm (``clip_grad_norm_``) inside the graph; None: no clip.
        warmup_steps: eager steps before capture (their effect on parameters and optimizer is undone).
        seed: seeds the dropout streams of the checkpointed layers.
        backward: call ``loss.backward()`` on what loss_fn returns (default). False: loss_fn runs its own
            backward passes (e.g. one per micro-batch, for gradient accumulation) and returns the loss to
            report, detached.

    The returned loss (and :attr:`grad_norm`) are static tensors that the next replay overwrites: clone
    them to keep them.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        max_grad_norm: float | None = None,
        warmup_steps: int = 3,
        seed: int = 0,
        backward: bool = True,
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            raise ValueError("CUDAGraphStep: the optimizer has no parameters")
        not_capturable = [i for i, g in enumerate(optimizer.param_groups) if not g.get("capturable", False)]
        if not_capturable:
            raise ValueError(
                f"CUDAGraphStep: param groups {not_capturable} of {type(optimizer).__name__} are not capturable; "
                "build the optimizer with capturable=True"
            )
        device = params[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDAGraphStep needs CUDA; the parameters are on {device}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.backward = backward
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.warmup_steps = warmup_steps
        self.device = device
        for group in optimizer.param_groups:  # the graph reads the learning rate from device memory
            lr = group["lr"]
            if not (torch.is_tensor(lr) and lr.device == device and lr.dtype == torch.float32):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        self._lrs = [group["lr"] for group in optimizer.param_groups]
        self.checkpointer: GraphSafeCheckpoint | None = None
        inner = getattr(model, "model", model)
        if hasattr(inner, "checkpoint_fn") and getattr(inner, "gradient_checkpointing", False):
            self.checkpointer = GraphSafeCheckpoint(device, seed)
            inner.checkpoint_fn = self.checkpointer
        self.graphs: dict[tuple, _Captured] = {}
        self.grad_norm: torch.Tensor | None = None

    def set_lr(self, lr: float, group: int | None = None) -> None:
        """Set the learning rate of one param group (or all) in place, where the graph reads it."""
        for i, value in enumerate(self._lrs):
            if group is None or group == i:
                value.fill_(float(lr))

    def adopt_lrs(self) -> None:
        """After a scheduler assigned plain numbers to ``param_group["lr"]``: copy them where the graph reads them.

        (``torch.optim.lr_scheduler`` classes assign floats; call this after each ``scheduler.step()``.)
        """
        for group, value in zip(self.optimizer.param_groups, self._lrs, strict=True):
            if group["lr"] is not value:
                value.fill_(float(group["lr"]))
                group["lr"] = value

    def rng_state(self) -> dict[str, Any]:
        """The dropout streams of the checkpointed layers, by layer index (host tensors), for a checkpoint."""
        if self.checkpointer is None:
            return {}
        layers = self._ensure_sites()
        seeds, sites = self.checkpointer.get_state()
        return {"seeds": seeds, "sites": [list(sites[id(layer)]) for layer in layers]}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Resume the streams of :meth:`rng_state` (call before the first step, or between steps)."""
        if self.checkpointer is None or not state:
            return
        layers = self._ensure_sites()
        if len(state["sites"]) != len(layers):
            raise ValueError(f"saved dropout streams for {len(state['sites'])} layers, the model has {len(layers)}")
        self.checkpointer.set_state(
            (state["seeds"], {id(layer): tuple(pair) for layer, pair in zip(layers, state["sites"], strict=True)})
        )

    def _ensure_sites(self) -> list[nn.Module]:
        """The checkpointed layers, each with its site, created in the order the forward meets them."""
        assert self.checkpointer is not None
        layers = list(getattr(getattr(self.model, "model", self.model), "layers", []))
        for layer in layers:
            self.checkpointer._site(layer)
        return layers

    def _check_lrs(self) -> None:
        for i, (group, value) in enumerate(zip(self.optimizer.param_groups, self._lrs, strict=True)):
            if group["lr"] is not value:
                raise ValueError(
                    f"param group {i}: its learning rate was replaced ({group['lr']!r}); the captured graph would "
                    "keep using the old one. Change it in place with CUDAGraphStep.set_lr"
                )

    def _one_step(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = self.loss_fn(self.model, *inputs)
        if self.backward:
            loss.backward()
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss, norm

    def _capture(self, key: tuple, inputs: Sequence[torch.Tensor]) -> None:
        static = [x.detach().clone() for x in inputs]
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {
            p: {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
            for p in self.params
            if self.optimizer.state.get(p)
        }
        rng = torch.cuda.get_rng_state(self.device)
        sites = self.checkpointer.get_state() if self.checkpointer is not None else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._one_step(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # undo the warm-up: parameters and optimizer state as they were
            for p, saved in zip(self.params, saved_params, strict=True):
                p.copy_(saved)
            for p in self.params:
                before = saved_state.get(p, {})
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v) and k in before:
                        v.copy_(before[k])
                    elif torch.is_tensor(v):  # created by the warm-up: a fresh state is all zeros
                        v.zero_()
        torch.cuda.set_rng_state(rng, self.device)  # and the random streams: the first replay draws what
        if self.checkpointer is not None and sites is not None:  # an eager first step would have drawn
            self.checkpointer.set_state(sites)
            self._ensure_sites()  # the sites set_state dropped, made again alike
        del saved_params, saved_state  # not kept through the capture: it should not add to the peak
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        if self.checkpointer is not None:
            self.checkpointer.register(graph)
        # No garbage collection while capturing: a finalizer that touches CUDA (an object left over from
        # earlier eager steps) would invalidate the capture.
        collect = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                loss, norm = self._one_step(static)
        except RuntimeError as err:  # name the usual causes; the CUDA message alone rarely does
            raise RuntimeError(
                f"capturing the training step for inputs {key} failed: {err}\n"
                "Usual causes: a host synchronisation in loss_fn or the model (.item(), float(tensor), printing "
                "a tensor, boolean-mask indexing or other data-dependent shapes), a CPU tensor copied to the GPU "
                "inside the step, a kernel compiled for the first time during capture (more warmup_steps), or the "
                "autograd graph of an earlier eager step still referenced (e.g. a `loss` variable: its "
                "gradient-accumulation nodes stay bound to the stream they were made on; delete it first)"
            ) from err
        finally:
            if collect:
                gc.enable()
        logger.info("captured a training step for inputs %s", key)
        self.graphs[key] = (graph, static, loss, norm)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._check_lrs()
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self.graphs:
            self._capture(key, inputs)
        graph, static, loss, norm = self.graphs[key]
        for dst, src in zip(static, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        self.grad_norm = norm
        return loss
