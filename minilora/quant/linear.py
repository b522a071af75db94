"""Quantized drop-in replacements for nn.Linear: `Linear4bit` (NF4/FP4) and `Linear8bit` (LLM.int8).

Each holds its weight as plain integer buffers and no float copy of it. The matmul is an autograd
function that dequantizes the weight in the forward, drops it, and dequantizes it again in the backward
to compute the input gradient: a frozen base costs its packed bytes only, while gradients still flow
through it to LoRA adapters further up (QLoRA section 3: "backpropagate through the frozen 4-bit
model").

    x ──> [ dequantize(W_q) ] ──> x @ W.T + b
    dL/dx = dL/dy @ dequantize(W_q)        (W_q gets no gradient)

On CPU the rebuilt weight goes into a buffer reused from call to call (workspace.py): a new tensor's page
faults would cost more than the dequantize itself.

`state_dict()` of these modules uses bitsandbytes' key names (`weight.absmax`, `weight.quant_map`,
..., `SCB`, `weight_format`), so a quantized model's state dict is a transformers + bitsandbytes
checkpoint as it stands.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minilora.errors import QuantStateError

from ..kernels.dispatch import use_fast_path
from . import workspace
from .blockwise import dequantize_4bit, quantize_4bit
from .int8 import dequantize_int8_rowwise, int8_linear, quantize_int8_rowwise
from .state import NestedState, QuantState


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x @ W.T with W rebuilt by `dequantize()` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        ctx.dequantize = dequantize
        return F.linear(x, dequantize())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.dequantize().to(grad_out.dtype), None


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
        return grad_out @ ctx.module.dequantize(grad_out.dtype), None


def _strip(prefix: str, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    return {name: tensors[prefix + name] for name in names if prefix + name in tensors}


class _BnbStateDict(nn.Module):
    """state_dict() in bitsandbytes' key names: whatever the subclass's `bnb_state_dict(prefix)` returns."""

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, value in self.bnb_state_dict(prefix).items():  # type: ignore[attr-defined]
            destination[key] = value if keep_vars else value.detach()


class Linear4bit(_BnbStateDict):
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
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> Linear4bit:
        return cls.from_weight(linear.weight.data, linear.bias, **kwargs)  # type: ignore[arg-type]

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

    def dequantize(self, dtype: torch.dtype | None = None, *, scratch: bool = False) -> torch.Tensor:
        """The weight [out, in] as float, in `dtype` (default: the dtype it was quantized from).

        scratch=True: the result may live in a buffer this thread reuses (workspace.py), valid until the next
        scratch dequantize of a weight of the same size and dtype; for a value used at once, as by the matmul.
        """
        dtype = dtype or self.weight_dtype
        numel = self.out_features * self.in_features
        if scratch and workspace.applies(self.weight.device, numel * dtype.itemsize):
            out = workspace.scratch(numel, dtype, self.weight.device)
            return dequantize_4bit(self.weight, self.quant_state, dtype, out=out)
        return dequantize_4bit(self.weight, self.quant_state, dtype)

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "weight": self.weight}
        out.update({prefix + "weight." + k: v for k, v in self.quant_state.as_dict(packed=True).items()})  # type: ignore[misc]
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.data
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing: list,
        unexpected: list,
        errors: list,
    ) -> None:
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

    # ---- footprint -------------------------------------------------------------------------------

    @property
    def weight_nbytes_transformers(self) -> int:
        """Bytes transformers' get_memory_footprint counts for this weight: the packed codes only."""
        return self.weight.numel()

    @property
    def nbytes_true(self) -> int:
        """Packed codes + absmax + nested absmax + code tables + offset."""
        return self.weight.numel() + self.quant_state.nbytes()

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        if use_fast_path(x):  # CUDA + Triton, reference not forced (minilora/kernels/dispatch.py)
            from ..kernels.matmul import linear_4bit

            y = linear_4bit(x.to(dtype), self.weight, self.quant_state)
        elif torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenWeightMatmul.apply(x.to(dtype), lambda: self.dequantize(dtype, scratch=True))
        else:  # no gradient to carry (inference, or a frozen input): the plain product, without autograd's cost
            y = F.linear(x.to(dtype), self.dequantize(dtype, scratch=True))
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        nested = ", double_quant" if hasattr(self, "nested_absmax") else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{nested}"
        )


class Linear8bit(_BnbStateDict):
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
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        threshold: float = 6.0,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear8bit:
        cb, scb = quantize_int8_rowwise(weight)
        return cls(cb, scb, bias, threshold, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> Linear8bit:
        return cls.from_weight(linear.weight.data, linear.bias, **kwargs)  # type: ignore[arg-type]

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8_rowwise(self.weight, self.SCB, dtype)

    def bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {
            prefix + "weight": self.weight,
            prefix + "SCB": self.SCB,
            prefix + "weight_format": torch.tensor(0, dtype=torch.uint8),
        }
        if self.bias is not None:
            out[prefix + "bias"] = self.bias.data
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing: list,
        unexpected: list,
        errors: list,
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "weight_format" in unexpected:
            unexpected.remove(prefix + "weight_format")

    @property
    def weight_nbytes_transformers(self) -> int:
        return self.weight.numel()

    @property
    def nbytes_true(self) -> int:
        return self.weight.numel() + self.SCB.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        y = _Int8Matmul.apply(x.to(dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

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
    quantized = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bit))]
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
