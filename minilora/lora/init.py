"""How a LoRA adapter starts: peft 0.21's `init_lora_weights` values, each a function of the base weight.

  "default"        A ~ kaiming-uniform(a=sqrt(5)), B = 0                    (Hu et al. 2021, section 4.1)
  "gaussian"       A ~ N(0, (1/r)^2), B = 0
  "pissa"          W = U S V^T (full SVD), keep the r largest singular triplets (Meng et al. 2024, eq. 2-4):
                       A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   W_res = W - s B A
  "pissa_niter_N"  the same with a randomized SVD (Halko et al. 2011, N subspace iterations), which costs
                   O(out * in * r) instead of O(out * in * min(out, in)); random, so seed it
  "olora"          W = Q R (QR decomposition), keep the first r columns / rows (Buyukakyuz 2024, section 3):
                       A = R[:r],   B = Q[:, :r],   W_res = W - s B A
  "loftq"          alternate a 4-bit quantization and a rank-r fit of what it missed (Li et al. 2023, alg. 1):
                       Q_t = NF4(W - B_{t-1} A_{t-1}),   B_t A_t = SVD_r(W - Q_t),   base := dequant(Q_T)
                   so that dequant(Q) + B A approximates W better than dequant(NF4(W)) alone

(s = alpha / r, or alpha / sqrt(r) with rsLoRA.) PiSSA and OLoRA move the principal part of W into the
adapter, so the base weight becomes the residual W_res and the model computes W x exactly on step 0.
LoftQ replaces the base by its own quantized-then-dequantized approximation: quantize that base with NF4
(blocksize 64, no double quant) and the codes come back unchanged: `lora.layer.quantize_lora_bases` does that after
`add_lora(float_model, init="loftq")`, which gives the QLoRA model LoftQ was designed for.

LoftQ and the scaling s. peft 0.21 sets A = R, B = L (L R = SVD_r(W - Q)) with no division by s (peft issue
1982, open), so its model starts at dequant(Q) + s L R: LoftQ's intended start only when s = 1 (alpha = r).
With s = 2 (minilora's demo: r 32, alpha 64) it is no better than plain NF4 at all: E - L R is orthogonal to
L R (Eckart-Young), so ||E - 2 L R||_F^2 = ||E - L R||^2 + ||L R||^2 = ||E||^2, E = W - Q, after one round
exactly plain NF4's error (on SmolLM2 the start's held-out loss is even a little worse than B = 0's). minilora
keeps peft's values by default (its adapters load in peft either way) and offers the fix as
`loftq_config={"loftq_bits": 4, "loftq_iter": N, "divide_by_scaling": True}`: A = R / sqrt(s),
B = L / sqrt(s), so s B A = L R and the forward starts at dequant(Q) + L R for any alpha (Q unchanged: it
depends on L R only). peft ignores the extra key and loads the saved A, B as they are.

All maths in float32; the residual is cast back to the base weight's dtype, as peft does.
"""

from __future__ import annotations

import re

import torch

from minilora.errors import ConfigError
from minilora.kernels import dequantize_4bit, quantize_4bit

SIMPLE_INITS = ("default", "gaussian")
BASE_CHANGING_INITS = ("pissa", "olora", "loftq")
LOFTQ_CONFIG_KEYS = ("loftq_bits", "loftq_iter", "divide_by_scaling")  # peft's two + minilora's fix
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init(init: str) -> str:
    """`init` if it names a supported initialisation, else a ConfigError listing them."""
    if init in SIMPLE_INITS or init in BASE_CHANGING_INITS or _PISSA_NITER.fullmatch(str(init)):
        return init
    raise ConfigError(
        f"init={init!r} is not supported; use one of {SIMPLE_INITS + BASE_CHANGING_INITS} or 'pissa_niter_N'"
    )


@torch.no_grad()
def pissa_init(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], W_res [out, in]) of PiSSA; niter: randomized SVD with that many iterations.

    The r principal singular triplets of W split evenly between A and B (sqrt(S) on each side), divided
    by s so that s B A = U_r S_r V_r^T exactly.
    """
    w = weight.to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        Ur, Sr, V = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r)
        Sr, Vhr = Sr / scaling, V.t()
    A = torch.diag(torch.sqrt(Sr)) @ Vhr  # (r, in)
    B = Ur @ torch.diag(torch.sqrt(Sr))  # (out, r)
    return A, B, w - scaling * B @ A


@torch.no_grad()
def olora_init(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], W_res [out, in]) of OLoRA: the first r columns of Q and rows of R in W = QR."""
    w = weight.to(torch.float32)
    Q, R = torch.linalg.qr(w)  # (out, k), (k, in)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, w - scaling * B @ A


def low_rank_fit(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B A the best rank-r approximation of `residual` (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    sqrt_s = torch.sqrt(torch.diag(S))  # (k, k)
    return sqrt_s[:r, :] @ Vh, U @ sqrt_s[:, :r]


def nf4_roundtrip(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """dequant(NF4(weight)): what a 4-bit base (no double quant) holds in place of `weight`, in float32."""
    packed, state = quantize_4bit(weight.to(torch.float32), blocksize, "nf4", compress_statistics=False)
    return dequantize_4bit(packed, state, torch.float32)


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor, r: int, num_bits: int = 4, num_iter: int = 1, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], dequant(Q) [out, in]) after `num_iter` rounds of LoftQ (NF4, blocksize 64).

    scaling: the s the forward will multiply B A by; A and B are divided by sqrt(s) so that s B A is the
    rank-r fit L R (1.0, the default: peft's A = R, B = L, see the module docstring).
    """
    if not scaling > 0:
        raise ConfigError(f"LoftQ scaling must be > 0, got {scaling!r} (lora_alpha must be positive)")
    if num_bits != 4:
        raise ConfigError(f"loftq_config loftq_bits={num_bits!r}: minilora's LoftQ supports NF4 (4 bits) only")
    if num_iter < 1:
        raise ConfigError(f"loftq_config loftq_iter={num_iter!r} must be >= 1")
    w = weight.to(torch.float32)
    target = w
    for step in range(num_iter):
        dequantized = nf4_roundtrip(target)
        A, B = low_rank_fit(w - dequantized, r)
        if step + 1 < num_iter:
            target = w - B @ A
    root = scaling**0.5
    return A / root, B / root, dequantized


def initial_weights(
    init: str, weight: torch.Tensor, r: int, scaling: float, loftq_config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, new base weight in float32) for one of the base-changing initialisations."""
    match = _PISSA_NITER.fullmatch(init)
    if init == "pissa" or match:
        return pissa_init(weight, r, scaling, niter=int(match.group(1)) if match else None)
    if init == "olora":
        return olora_init(weight, r, scaling)
    if init == "loftq":
        cfg = loftq_config or {}
        unknown = sorted(set(cfg) - set(LOFTQ_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"loftq_config keys {unknown} are not known; use {list(LOFTQ_CONFIG_KEYS)}")
        divide = cfg.get("divide_by_scaling", False)
        if not isinstance(divide, bool):
            raise ConfigError(f"loftq_config divide_by_scaling={divide!r} must be true or false")
        bits, iters = int(cfg.get("loftq_bits", 4)), int(cfg.get("loftq_iter", 1))
        return loftq_init(weight, r, bits, iters, scaling if divide else 1.0)
    raise ConfigError(f"init={init!r} does not change the base weight")
