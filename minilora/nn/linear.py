"""Quantized drop-in replacements for nn.Linear: `Linear4bit` (NF4/FP4) and `Linear8bit` (LLM.int8).

Each holds its weight as plain integer buffers and no float copy of it. The matmul is an autograd
function that dequantizes the weight in the forward, drops it, and dequantizes it again in the backward
to compute the input gradient: a frozen base costs its packed bytes only, while gradients still flow
through it to LoRA adapters further up (QLoRA section 3: "backpropagate through the frozen 4-bit
model").

    x ──> [ dequantize(W_q) ] ──> x @ W.T + b
    dL/dx = dL/dy @ dequantize(W_q)        (W_q gets no gradient)

Both are `QuantizedLinear`s: the one interface lora/, io/ and train/ read, whatever the format
(`quant_format` "nf4", "fp4" or "int8", `dequantize(dtype)`, `requantize(weight, bias)`, the footprint).
Which implementation quantizes, dequantizes and multiplies is the door's choice (minilora.kernels):
on CPU the rebuilt weight goes into a buffer reused from call to call, on CUDA into Triton kernels.

`state_dict()` of these modules uses bitsandbytes' key names (`weight.absmax`, `weight.quant_map`,
..., `SCB`, `weight_format`), so a quantized model's state dict is a transformers + bitsandbytes
checkpoint as it stands.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from minilora.errors import QuantStateError

from ..kernels import dequantize_4bit, linear_4bit, quantize_4bit, quantize_int8
from ..quant.int8 import dequantize_int8_rowwise, int8_linear
from ..quant.state import NestedState, QuantState


class _Int8Matmul(torch.autograd.Function):
    """LLM.int8 forward; the backward uses the dequantized weight (as bitsandbytes does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: Linear8bit) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return int8_linear(x, module.weight, module.SCB, module.threshold)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.module.dense_weight(grad_out.dtype), None


class QuantizedLinear(nn.Module, abc.ABC):
    """A frozen Linear [out, in] whose weight is stored quantized: what every format offers its readers.

    in_features, out_features, bias, compute_dtype   as on nn.Linear (compute_dtype: of the matmul, else x's)
    quant_format                                     "nf4", "fp4" or "int8"
    dequantize(dtype)                                the weight [out, in] as float
    requantize(weight, bias)                         a new module of this format and settings holding `weight`
    weight_nbytes_transformers, nbytes_true          the footprint, as transformers counts it and in full
    cached_weight                                    a dequantized weight every matmul uses while set
                                                     (train/weight_cache.py), None otherwise
    state_dict()                                     in bitsandbytes' key names (`bnb_state_dict(prefix)`)
    """

    in_features: int
    out_features: int
    compute_dtype: torch.dtype | None
    bias: nn.Parameter | None
    cached_weight: torch.Tensor | None = None

    @property
    @abc.abstractmethod
    def quant_format(self) -> str:
        """The format: "nf4", "fp4" or "int8"."""

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] as float, in `dtype` (default: the format's)."""

    @abc.abstractmethod
    def requantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantizedLinear:
        """A new module of this format and settings holding `weight` (merging an adapter into the base)."""

    @abc.abstractmethod
    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors under bitsandbytes' key names for module `prefix`."""

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T (no bias), x already in the compute dtype."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> QuantizedLinear:
        """`cls.from_weight(linear.weight, linear.bias, **kwargs)`: the swap for an nn.Linear."""
        return cls.from_weight(linear.weight.data, linear.bias, **kwargs)  # type: ignore[attr-defined]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight in dtype for one product: the cached one while set, else dequantized now."""
        cached = self.cached_weight
        return self.dequantize(dtype) if cached is None else cached.to(dtype)

    @property
    def weight_nbytes_transformers(self) -> int:
        """Bytes transformers' get_memory_footprint counts for this weight: the stored codes only."""
        return self.weight.numel()  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        y = self.matmul(x.to(dtype))
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, value in self.bnb_state_dict(prefix).items():
            destination[key] = value if keep_vars else value.detach()


def float_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of nn.Linear (the parameter itself) or of a QuantizedLinear (dequantized)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, QuantizedLinear):
        return module.dequantize()
    raise ValueError(f"expected nn.Linear or a QuantizedLinear, got {type(module).__name__}")


class Linear4bit(QuantizedLinear):
    """A Linear whose weight is NF4/FP4 blockwise-quantized (optionally double-quantized)."""

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight [out, in], got shape {list(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.weight_dtype = state.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        if state.state2 is not None:
            assert state.offset is not None, "double-quantized state without offset"
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_quant_map", state.state2.code)
            self.register_buffer("offset", state.offset.reshape(()))
            self.nested_blocksize = state.state2.blocksize
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        packed, state = quantize_4bit(weight, blocksize, quant_type, compress_statistics)
        return cls(packed, state, bias, compute_dtype)

    @classmethod
    def from_bnb_state_dict(
        cls, tensors: dict[str, torch.Tensor], prefix: str, *, compute_dtype: torch.dtype | None = None
    ) -> Linear4bit:
        """Build from the keys transformers + bitsandbytes save for module `prefix` (ending in '.')."""
        where = prefix.rstrip(".") or "Linear4bit"
        if prefix + "weight" not in tensors:
            raise QuantStateError(f"{where}: missing key {prefix}weight")
        packed = tensors[prefix + "weight"]
        items = {k[len(prefix + "weight.") :]: v for k, v in tensors.items() if k.startswith(prefix + "weight.")}
        state = QuantState.from_dict(items, where=where)
        if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
            raise QuantStateError(
                f"{where}: {prefix}weight is {tuple(packed.shape)} {packed.dtype}, but its quant state "
                f"(shape {list(state.shape)}) needs ({(state.numel + 1) // 2}, 1) uint8"
            )
        return cls(packed.reshape(-1, 1), state, tensors.get(prefix + "bias"), compute_dtype)

    # ---- the state -------------------------------------------------------------------------------

    @property
    def quant_state(self) -> QuantState:
        state2, offset = None, None
        if hasattr(self, "nested_absmax"):
            state2 = NestedState(self.nested_absmax, self.nested_quant_map, self.nested_blocksize)
            offset = self.offset
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.weight_dtype,
            offset=offset,
            state2=state2,
        )

    @property
    def quant_format(self) -> str:
        return self.quant_type

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] as float, in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.weight_dtype)

    def requantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit:
        return Linear4bit.from_weight(
            weight,
            bias,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=hasattr(self, "nested_absmax"),  # double quant keeps nested absmax buffers
            compute_dtype=self.compute_dtype,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight, self.quant_state, weight=self.cached_weight)

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "weight": self.weight}
        out.update({prefix + "weight." + k: v for k, v in self.quant_state.as_dict(packed=True).items()})  # type: ignore[misc]
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.data
        return out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        errors: list = args[4]  # type: ignore[assignment]  # nn.Module's order: metadata, strict, missing, unexpected, errors
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            loaded = Linear4bit.from_bnb_state_dict(mine, prefix, compute_dtype=self.compute_dtype)
        except ValueError as err:
            errors.append(str(err))
            return
        if (loaded.out_features, loaded.in_features) != (self.out_features, self.in_features):
            errors.append(
                f"{prefix}weight: checkpoint shape {[loaded.out_features, loaded.in_features]} != "
                f"module shape {[self.out_features, self.in_features]}"
            )
            return
        # Adopt the loaded quantization (blocksize, type and double quant may differ from ours).
        self._buffers.clear()
        self._buffers.update(loaded._buffers)
        for name in ("blocksize", "quant_type", "weight_dtype", "nested_blocksize"):
            if hasattr(loaded, name):
                setattr(self, name, getattr(loaded, name))
        if loaded.bias is not None:
            self.bias = loaded.bias

    @property
    def nbytes_true(self) -> int:
        """Packed codes + absmax + nested absmax + code tables + offset."""
        return self.weight.numel() + self.quant_state.nbytes()

    def extra_repr(self) -> str:
        nested = ", double_quant" if hasattr(self, "nested_absmax") else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{nested}"
        )


class Linear8bit(QuantizedLinear):
    """A Linear whose weight is int8 with one float32 scale per output row (LLM.int8)."""

    def __init__(
        self,
        cb: torch.Tensor,
        scb: torch.Tensor,
        bias: torch.Tensor | None = None,
        threshold: float = 6.0,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cb.dim() != 2 or cb.dtype != torch.int8 or scb.shape != (cb.shape[0],):
            raise ValueError(
                f"Linear8bit needs weight int8 [out, in] and SCB [out]; got {tuple(cb.shape)} {cb.dtype} "
                f"and {tuple(scb.shape)}"
            )
        self.out_features, self.in_features = cb.shape
        self.threshold = threshold
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", cb)
        self.register_buffer("SCB", scb.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, threshold: float = 6.0,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear8bit:  # fmt: skip
        cb, scb = quantize_int8(weight)
        return cls(cb, scb, bias, threshold, compute_dtype)

    @classmethod
    def from_bnb_state_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        prefix: str,
        *,
        threshold: float = 6.0,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear8bit:
        where = prefix.rstrip(".") or "Linear8bit"
        missing = [prefix + k for k in ("weight", "SCB") if prefix + k not in tensors]
        if missing:
            raise QuantStateError(f"{where}: missing keys {missing}")
        cb, scb = tensors[prefix + "weight"], tensors[prefix + "SCB"]
        if cb.dtype != torch.int8 or cb.dim() != 2 or scb.shape != (cb.shape[0],):
            raise QuantStateError(
                f"{where}: weight {tuple(cb.shape)} {cb.dtype} with SCB {tuple(scb.shape)} is not an int8 "
                "[out, in] weight with one scale per row"
            )
        return cls(cb, scb, tensors.get(prefix + "bias"), threshold, compute_dtype)

    quant_format = "int8"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8_rowwise(self.weight, self.SCB, dtype or torch.float32)

    def requantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear8bit:
        return Linear8bit.from_weight(weight, bias, threshold=self.threshold, compute_dtype=self.compute_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self)  # LLM.int8's product: a cached float weight serves its backward only

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {
            prefix + "weight": self.weight,
            prefix + "SCB": self.SCB,
            prefix + "weight_format": torch.tensor(0, dtype=torch.uint8),
        }
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.data
        return out

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        unexpected: list = args[3]  # type: ignore[assignment]  # nn.Module's order, as in Linear4bit
        if prefix + "weight_format" in unexpected:
            unexpected.remove(prefix + "weight_format")

    @property
    def nbytes_true(self) -> int:
        return self.weight.numel() + self.SCB.numel() * 4

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8, threshold={self.threshold}"
        )


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module | None],
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Swap every nn.Linear (but those whose last name part is in `skip`) for `make(name, linear)`.

    One walk over the module tree; `make` returns the replacement, or None to keep the Linear.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, linear in targets:
        replacement = make(name, linear)
        if replacement is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model


def quantized_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes as transformers counts them, true bytes) of a model's parameters and buffers.

    transformers' get_memory_footprint counts a 4-bit weight by its packed bytes and leaves out the
    quant state and SCB; the true count includes them.
    """
    counted, true = 0, 0
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    skip = {id(t) for m in quantized for t in m.buffers(recurse=False)}
    for m in quantized:
        counted += m.weight_nbytes_transformers
        true += m.nbytes_true
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in skip:
            continue
        counted += tensor.numel() * tensor.element_size()
        true += tensor.numel() * tensor.element_size()
    return counted, true
