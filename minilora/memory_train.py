"""Will training fit? The peak memory of one (Q)LoRA training step, per item, from a config alone.

The question users ask (peft, bitsandbytes, accelerate issues) is not the weights' size but "with this
rank, these targets, this batch and length, does a step fit?". A step's peak holds

    weights        the frozen base: quantized Linears by their packed codes, the rest in `dtype`
    quant state    absmax, nested absmax, code tables (4-bit)
    adapter        LoRA A and B (float32)
    gradients      one float32 gradient per adapter parameter
    AdamW states   exp_avg and exp_avg_sq, float32, per adapter parameter
    activations    what autograd saves in the forward for the backward
    logits         the output head's float32 log-softmax (saved) and its gradients (2 x N x V, at the start
                   of the backward); N = batch x (seq - 1) learned positions
    recompute      with gradient checkpointing: one layer's activations, rebuilt in the backward

Activations are not guessed from a formula: minilora's own decoder is built on the meta device (shapes,
no memory), quantized with meta quant state, given its LoRA adapters, and run forward under
``torch.autograd.graph.saved_tensors_hooks``; every distinct storage autograd saves that is not a
parameter or buffer is counted (attention as the fused kernels save it: q, k, v, output, logsumexp).
With gradient checkpointing, a layer saves only its input (held by the
checkpoint) and one layer's activations come back during its backward. The estimate assumes the model's
float dtype is its compute dtype (no autocast), as minilora runs on the CPU (float32) and as
benchmarks/gpu/train_memory.py runs the GPU (bfloat16 weights, bfloat16 compute).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from minilora.errors import ConfigError
from minilora.memory import QUANTIZED_LINEARS, _fmt_bytes, _meta_model, gb, load_config
from minilora.models.config import ModelConfig

SHORT_TARGETS = {t.split("_")[0]: t for t in QUANTIZED_LINEARS}


@dataclass(frozen=True)
class TrainSetup:
    """The training step whose memory is estimated."""

    r: int = 32
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch: int = 4
    seq: int = 182
    gradient_checkpointing: bool = False
    quantize: str = "nf4"  # "nf4", "fp4" or "none"
    double_quant: bool = True
    blocksize: int = 64
    dtype: torch.dtype = torch.float32  # the base's float tensors and the compute dtype

    def __post_init__(self) -> None:
        if self.quantize not in ("nf4", "fp4", "none"):
            raise ConfigError(f"--quantize {self.quantize!r}: the training estimate covers nf4, fp4 and none")
        for name in ("r", "batch", "seq", "blocksize"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class TrainFootprint:
    """Bytes per item of one training step's peak (see the module docstring) and their total."""

    source: str
    config: ModelConfig
    setup: TrainSetup
    items: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0

    @property
    def total(self) -> int:
        return sum(self.items.values())


def expand_targets(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """ "q,k,v,o" or "q_proj,v_proj" or "all" -> full module names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if items in (["all"], ["all-linear"]):
        return QUANTIZED_LINEARS
    return tuple(SHORT_TARGETS.get(t.strip(), t.strip()) for t in items if t.strip())


def _meta_linear4bit(linear: nn.Linear, setup: TrainSetup) -> nn.Module:
    """A Linear4bit with meta packed codes and quant state of the right shapes (nothing is quantized)."""
    from minilora.nn import Linear4bit
    from minilora.quant.state import NestedState, QuantState

    out_f, in_f = linear.out_features, linear.in_features
    n = out_f * in_f
    n_blocks = -(-n // setup.blocksize)
    meta = {"device": "meta"}
    if setup.double_quant:
        absmax = torch.empty(n_blocks, dtype=torch.uint8, **meta)
        nested = NestedState(torch.empty(-(-n_blocks // 256), **meta), torch.empty(256, **meta), 256)
        offset = torch.empty((), **meta)
    else:
        absmax, nested, offset = torch.empty(n_blocks, **meta), None, None
    state = QuantState(
        absmax, torch.Size([out_f, in_f]), torch.empty(16, **meta), setup.blocksize, setup.quantize, setup.dtype
    )
    state.offset, state.state2 = offset, nested
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **meta)
    return Linear4bit(packed, state, linear.bias, compute_dtype=setup.dtype)


def meta_training_model(config: ModelConfig, setup: TrainSetup) -> nn.Module:
    """minilora's decoder on the meta device, quantized as ``setup`` says, with LoRA on ``setup.targets``."""
    from minilora.lora import add_lora

    model = _meta_model(config).to(setup.dtype)
    if setup.quantize != "none":
        for layer in model.model.layers:
            for name, module in list(layer.named_modules()):
                if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS:
                    layer.set_submodule(name, _meta_linear4bit(module, setup))
    add_lora(model, r=setup.r, alpha=2 * setup.r, target_modules=list(setup.targets))
    return model.train()


class _FlashAttentionProfile(torch.autograd.Function):
    """Stands in for F.scaled_dot_product_attention in the meta trace with what the fused kernels (flash /
    memory-efficient, on CUDA and CPU) save: q, k, v, the output and a float32 logsumexp per row, never the
    T x T attention matrix that the meta device's reference decomposition would save."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, nh, T, _ = q.shape
        out = q.new_empty(B, T, nh, v.shape[-1]).transpose(1, 2)  # (B, nh, T, hd), laid out (B, T, nh, hd) as theirs
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, nh, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return _FlashAttentionProfile.apply(q, k, v)


def saved_bytes(fn, exclude: set[int], fused_attention: bool = True) -> tuple[int, object]:  # noqa: ANN001
    """(bytes of the distinct storages autograd saves while ``fn()`` runs, minus ``exclude``; fn's result).

    Works on real tensors as on meta ones; ``fused_attention`` replaces SDPA by :class:`_FlashAttentionProfile`.
    """
    seen: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in exclude and key not in seen:
            seen[key] = (storage.nbytes(), t)  # the tensor is kept so its storage's address stays unique
        return t

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if fused_attention:
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa  # the models call it through F.<name>
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return sum(n for n, _ in seen.values()), result


def train_footprint(
    path_or_config: str | os.PathLike | ModelConfig | dict, setup: TrainSetup = TrainSetup()
) -> TrainFootprint:
    """The estimated peak of one training step for ``setup`` (see the module docstring)."""
    config, source = load_config(path_or_config)
    model = meta_training_model(config, setup)
    B, T, C, V = setup.batch, setup.seq, config.hidden_size, config.vocab_size
    fp = TrainFootprint(source, config, setup)

    lora, weights, state = 0, 0, 0
    tensors = {id(t): (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, t in tensors.values():
        nbytes = t.numel() * t.element_size()
        if "lora_" in name:
            lora += nbytes
        elif name.endswith(("absmax", "quant_map", "offset")):
            state += nbytes
        else:
            weights += nbytes
    fp.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    exclude = {t.untyped_storage()._cdata for _, t in tensors.values()}

    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    cos_sin = model.model.rotary_emb(torch.arange(T, device="meta").expand(B, T), setup.dtype)
    x = torch.empty(B, T, C, dtype=setup.dtype, device="meta", requires_grad=True)
    shared = {t.untyped_storage()._cdata for t in cos_sin}  # RoPE tables: one pair serves every layer
    per_layer, _ = saved_bytes(lambda: model.model.layers[0](x, *cos_sin, None), exclude | shared)
    model.model.gradient_checkpointing = False
    decoder, hidden = saved_bytes(lambda: model.model(ids), exclude)
    n = B * (T - 1)

    def head() -> torch.Tensor:
        h = hidden[:, :-1].reshape(n, C)  # (N, C): every position learned (the worst case)
        logits = model.lm_head(h).float()  # (N, V)
        return torch.nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device="meta"))

    head_saved, _ = saved_bytes(head, exclude)
    layers = config.num_hidden_layers
    fp.items["weights"] = weights
    fp.items["quant state"] = state
    fp.items["adapter (fp32)"] = lora
    fp.items["gradients (fp32)"] = lora
    fp.items["AdamW states (fp32)"] = 2 * lora
    if setup.gradient_checkpointing:
        layer_inputs = layers * B * T * C * torch.empty((), dtype=setup.dtype).element_size()
        fp.items["activations (checkpointed: layer inputs)"] = layer_inputs + decoder - layers * per_layer
        fp.items["recompute (one layer, in the backward)"] = per_layer
    else:
        fp.items["activations"] = decoder
    fp.items["logits (saved log-softmax + 2 gradients)"] = head_saved + 2 * n * V * 4
    return fp


def train_footprint_report(path_or_config: str | os.PathLike | ModelConfig | dict, setup: TrainSetup) -> str:
    """A markdown table of :func:`train_footprint`."""
    fp = train_footprint(path_or_config, setup)
    s = fp.setup
    gc = "with" if s.gradient_checkpointing else "without"
    quant = f"{s.quantize}{' + double quant' if s.double_quant and s.quantize != 'none' else ''}"
    lines = [
        f"# Training memory of {fp.source}",
        "",
        f"LoRA r={s.r} on {','.join(s.targets)} ({fp.trainable_params:,} trainable parameters), batch {s.batch} x "
        f"{s.seq} tokens, {gc} gradient checkpointing, base {quant}, {str(s.dtype).replace('torch.', '')} "
        "compute, AdamW.",
        "",
        "| item | bytes | size |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:,} | {_fmt_bytes(v) if v else '0'} |" for k, v in fp.items.items()]
    lines += [f"| **total (estimated peak)** | {fp.total:,} | **{gb(fp.total)}** |", ""]
    lines.append(
        "Activations are what minilora's autograd saves, traced on the meta device; logits assume every "
        "position is learned. Measured: benchmarks/results/train-memory-*.md."
    )
    return "\n".join(lines) + "\n"
