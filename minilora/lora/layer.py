"""LoRALinear: a frozen base Linear (float, 8-bit or 4-bit) plus trainable low-rank adapters.

LoRA (Hu et al. 2021, section 4.1) keeps W frozen and learns a low-rank update:

          x ──────────────► base_layer (W, frozen) ─────────────┐
          │                                                      (+) ──► y
          └─► dropout ─► lora_A [r, in] ─► lora_B [out, r] ─► * scaling ┘

    y = W x + scaling * B A dropout(x),   scaling = alpha / r           (LoRA, section 4.1)
                                          scaling = alpha / sqrt(r)     (rsLoRA, Kalajdzievski 2023)

A starts kaiming-uniform (a = sqrt(5), as nn.Linear) and B starts at zero, so B A = 0 and the wrapped
model computes exactly what the base model computed on step 0; training moves B away from zero.
Dividing by r makes the size of the update roughly independent of the rank, so alpha can stay fixed
while r is tuned (section 4.1: "tuning alpha is roughly the same as tuning the learning rate").

DoRA (Liu et al. 2024, section 4) splits the merged weight into a per-row magnitude m and a direction:
    W' = m * (W + s B A) / ||W + s B A||_row,   the norm detached from the graph (section 4.3), so
    y = base(x) + (g - 1) * (W x) + g * s * B A x,  g = m / ||W + s B A||_row.
m is a trainable vector initialised to ||W||_row, so DoRA also starts equal to the base model.

QLoRA (Dettmers et al. 2023, section 3): the base may be a 4-bit or 8-bit `minilora.nn.QuantizedLinear`;
adapters stay float32 (by default), the input is cast to the adapter dtype and the adapter output back
to the base output's dtype. Gradients flow to A, B (and m) through the frozen quantized base.

Submodule names follow peft so state-dict keys line up: `base_layer`, `lora_A.<name>.weight`,
`lora_B.<name>.weight`, `lora_magnitude_vector.<name>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minilora.errors import AdapterError
from minilora.kernels import lora_linear_4bit
from minilora.lora.init import check_init, initial_weights
from minilora.nn import Linear4bit, QuantizedLinear, float_weight


@dataclass
class AdapterSettings:
    """r, alpha and the scaling they give for one named adapter on one layer."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    use_dora: bool


@dataclass
class MergeReport:
    """What merging one adapter into one base layer cost.

    On a float base the merge is exact up to float rounding and both errors are 0.0. On a quantized base
    the merged weight is requantized: max_abs_error = max |W_requant - W_merged|, rel_error =
    ||W_requant - W_merged||_F / ||W_merged||_F (both against the float32 merged weight).
    """

    module: str
    adapter: str
    quantized: bool
    max_abs_error: float
    rel_error: float


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """A base Linear plus one or more named LoRA adapters, one of them active."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
        loftq_config: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"LoRALinear wraps nn.Linear or a quantized Linear, got {type(base).__name__}")
        self.base_layer = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.settings: dict[str, AdapterSettings] = {}
        self.active_adapter: str = adapter_name
        self.disabled: bool = False  # True: forward is the base layer alone
        self.row_adapters: list[str] | None = None  # a mixed batch: row i's adapter (lora/multi.py, mixed_batch)
        self.merged_adapters: list[str] = []
        # What unmerge needs: DoRA's pre-merge row norms, and the pre-merge module of a quantized base.
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        self._premerge_base: dict[str, nn.Module] = {}
        self.add_adapter(adapter_name, r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype, loftq_config)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedLinear)

    def add_adapter(  # __init__'s adapter arguments (peft's update_layer takes the same)
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        loftq_config: dict | None = None,
    ) -> None:
        """Create adapter `name` (A [r, in], B [out, r], optional DoRA magnitude [out]) with peft's init.

        PiSSA, OLoRA and LoftQ (lora/init.py) also rewrite the base weight, as peft does.
        """
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got r={r!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if "." in name or not name:
            raise ValueError(f"adapter name must be non-empty and contain no '.', got {name!r}")
        device = _device_of(self.base_layer)
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init == "default":
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)  # B = 0: the adapter starts as an exact no-op
        elif init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
            nn.init.zeros_(lora_B.weight)
        else:
            self._init_from_base(check_init(init), lora_A, lora_B, r, scaling, loftq_config)
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.settings[name] = AdapterSettings(r, alpha, scaling, dropout, use_dora)
        if use_dora:
            with torch.no_grad():
                weight = float_weight(self.base_layer).to(adapter_dtype)
                magnitude = torch.linalg.norm(weight + scaling * self.lora_delta(name, unscaled=True), dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude)  # (out,)

    @torch.no_grad()
    def _init_from_base(
        self, init: str, lora_A: nn.Linear, lora_B: nn.Linear, r: int, scaling: float, loftq_config: dict | None
    ) -> None:
        """PiSSA / OLoRA / LoftQ: A and B from the base weight, which becomes the residual (or dequant(Q))."""
        if self.quantized and init != "olora":
            # as peft: the SVD needs the float weight; quantize the residual afterwards (QPiSSA, LoftQ)
            raise AdapterError(
                f"init={init!r} needs a float base layer, got {type(self.base_layer).__name__}; initialise on the "
                "float model, then quantize its base weights"
            )
        weight = float_weight(self.base_layer)
        A, B, new_base = initial_weights(init, weight, r, scaling, loftq_config)
        lora_A.weight.data = A.to(lora_A.weight.dtype).contiguous()
        lora_B.weight.data = B.to(lora_B.weight.dtype).contiguous()
        if self.quantized:
            bias = getattr(self.base_layer, "bias", None)
            self.base_layer = self.base_layer.requantize(new_base.to(weight.dtype), bias)
        else:
            self.base_layer.weight.data = new_base.to(weight.dtype)

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter; a layer without it then computes the base layer alone (as peft)."""
        self.active_adapter = name

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` (default: the active one)."""
        name = name or self.active_adapter
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def lora_delta(self, name: str, unscaled: bool = False) -> torch.Tensor:
        """scaling * B @ A as an [out, in] matrix in the adapter dtype (without scaling if `unscaled`)."""
        delta = self.lora_B[name].weight @ self.lora_A[name].weight  # (out, r) @ (r, in) -> (out, in)
        return delta if unscaled else delta * self.settings[name].scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_batch_forward(x, self.row_adapters)
        if (fused := self._fused_decode(x)) is not None:  # a GPU at decode: one kernel adds B A x (kernels/)
            return fused
        result = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged_adapters or name not in self.lora_A:
            return result
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        scaling = self.settings[name].scaling
        dropout = self.lora_dropout[name]
        x = x.to(lora_A.weight.dtype)
        if name in self.lora_magnitude_vector:
            delta = self._dora_delta(x, result, name)
        else:
            delta = lora_B(lora_A(dropout(x))) * scaling
        if self.quantized:
            # peft's bitsandbytes layers cast the adapter output first, then add in the base dtype.
            return result + delta.to(result.dtype)
        return (result + delta).to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """W x for every row, plus s B A x of row i's adapter names[i] ("__base__", or one this layer lacks: none)."""
        if x.shape[0] != len(names):
            raise AdapterError(f"a mixed batch names {len(names)} adapters for {x.shape[0]} rows")
        result = self.base_layer(x)
        for name in dict.fromkeys(names):  # each adapter once, in order of first use
            if name not in self.lora_A:
                continue
            rows = [i for i, n in enumerate(names) if n == name]
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            sub = x[rows].to(lora_A.weight.dtype)
            delta = lora_B(lora_A(self.lora_dropout[name](sub))) * self.settings[name].scaling
            result[rows] += delta.to(result.dtype)  # peft's order: the adapter's output cast, then added
        return result

    def _fused_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """forward's result from kernels.lora_linear_4bit where it applies (None elsewhere): plain LoRA on a
        4-bit base without bias or cached weight, no dropout to draw, x in the compute and adapter dtype."""
        if not x.is_cuda or torch.is_grad_enabled():  # the cheap checks first: CPU and training pay nothing
            return None
        name, base = self.active_adapter, self.base_layer
        if (
            not isinstance(base, Linear4bit)
            or self.disabled
            or self.merged_adapters
            or name not in self.lora_A
            or name in self.lora_magnitude_vector
            or base.bias is not None
            or base.cached_weight is not None
            or x.dtype != (base.compute_dtype or x.dtype)
            or (self.training and not isinstance(self.lora_dropout[name], nn.Identity))
        ):
            return None
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        return lora_linear_4bit(x, base.weight, base.quant_state, lora_a, lora_b, self.settings[name].scaling)

    def _dora_delta(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """(g - 1) * W x + g * s * B A x, g = m / ||W + s B A||_row with the norm detached (DoRA 4.3)."""
        scaling = self.settings[name].scaling
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        weight = float_weight(self.base_layer).to(x.dtype)
        norm = torch.linalg.norm(weight + scaling * self.lora_delta(name, unscaled=True).detach(), dim=1)
        g = (self.lora_magnitude_vector[name] / norm.detach()).view(1, -1)  # (1, out)
        dropout = self.lora_dropout[name]
        if self.training and not isinstance(dropout, nn.Identity):
            # With dropout the base term must see the same dropped input as the adapter term.
            x = dropout(x)
            base_out = F.linear(x, weight)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result if bias is None else result - bias
        return (g - 1) * base_out + g * lora_B(lora_A(x)) * scaling

    # ---- merge / unmerge -------------------------------------------------------------------------------

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """W + s B A (LoRA) or m * (W + s B A) / ||W + s B A||_row (DoRA), in the dtype of `weight`."""
        delta = self.lora_delta(name).to(weight.dtype)
        merged = weight + delta
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude_vector[name].to(weight.dtype) / norm).view(-1, 1) * merged
        return merged

    @torch.no_grad()
    def merge(self, name: str | None = None, module_name: str = "") -> MergeReport:
        """Fold adapter `name` into the base weight; a quantized base: dequantize, add, requantize."""
        name = name or self.active_adapter
        if name not in self.lora_A:
            raise ValueError(f"no adapter named {name!r} on {module_name or 'this layer'}")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged into {module_name or 'this layer'}")
        if not self.quantized:
            weight = self.base_layer.weight
            delta = self.lora_delta(name).to(weight.dtype)
            if name in self.lora_magnitude_vector:
                norm = torch.linalg.norm(weight.to(delta.dtype) + delta, dim=1)
                self._dora_merge_norm[name] = norm
                factor = (self.lora_magnitude_vector[name] / norm).view(-1, 1)  # (out, 1)
                weight.data = (factor * (weight.data + delta)).to(weight.dtype)
            else:
                weight.data += delta
            self.merged_adapters.append(name)
            return MergeReport(module_name, name, quantized=False, max_abs_error=0.0, rel_error=0.0)

        old = self.base_layer
        dequantized = old.dequantize()
        target = self.merged_weight(dequantized.to(torch.float32), name)
        bias = None if getattr(old, "bias", None) is None else old.bias.detach().clone()
        new = old.requantize(target.to(dequantized.dtype), bias)
        error = new.dequantize().to(torch.float32) - target
        report = MergeReport(
            module_name,
            name,
            quantized=True,
            max_abs_error=error.abs().max().item(),
            rel_error=(torch.linalg.norm(error) / torch.linalg.norm(target)).item(),
        )
        self._premerge_base[name] = old
        self.base_layer = new
        self.merged_adapters.append(name)
        return report

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo the last merge: subtract on a float base, restore the pre-merge module on a quantized one."""
        if not self.merged_adapters:
            raise ValueError("nothing to unmerge: no adapter is merged into this layer")
        name = self.merged_adapters.pop()
        if name in self._premerge_base:
            self.base_layer = self._premerge_base.pop(name)
            return
        weight = self.base_layer.weight
        delta = self.lora_delta(name).to(weight.dtype)
        if name in self.lora_magnitude_vector:
            norm = self._dora_merge_norm.pop(name)
            factor = (self.lora_magnitude_vector[name] / norm).view(-1, 1)  # (out, 1)
            weight.data = (weight.data / factor - delta).to(weight.dtype)
        else:
            weight.data -= delta

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the active adapter merged (computed in float32, then cast to `dtype`).

        dtype defaults to the base weight's dtype (for a quantized base: the dtype it was quantized from).
        If an adapter is already merged, the current base weight is taken as is.
        """
        weight = float_weight(self.base_layer).detach()
        dtype = dtype or weight.dtype
        merged = weight.to(torch.float32)
        if not self.merged_adapters and self.active_adapter in self.lora_A:
            merged = self.merged_weight(merged, self.active_adapter)
        bias = getattr(self.base_layer, "bias", None)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype
        )
        linear.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        s = self.settings.get(self.active_adapter)
        active = "none" if s is None else f"r={s.r}, alpha={s.alpha}, scaling={s.scaling:g}, dora={s.use_dora}"
        names = sorted(self.lora_A)
        return f"active={self.active_adapter!r} ({active}), adapters={names}, disabled={self.disabled}"


def quantize_lora_bases(
    model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> int:  # fmt: skip
    """Replace the float base of every LoRALinear in `model` by a 4-bit Linear; returns how many.

    The QLoRA step after a base-changing init (LoftQ, QPiSSA). With the defaults a LoftQ base
    dequant(NF4(W')) re-quantizes to the same codes and absmax, so the model keeps dequant(Q) + B A.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and not module.quantized:
            base = module.base_layer
            module.base_layer = Linear4bit.from_weight(
                base.weight.data, base.bias, blocksize=blocksize, quant_type=quant_type,
                compress_statistics=double_quant, compute_dtype=compute_dtype,
            )  # fmt: skip
            count += 1
    return count
