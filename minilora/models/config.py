"""The model configuration, read from a transformers-style ``config.json``.

One dataclass, :class:`ModelConfig`, describes every decoder minilora runs: Llama 2/3/3.1/3.2 (and the
SmolLM2 / TinyLlama checkpoints that call themselves ``llama``), Mistral, Qwen2/2.5, and (their switches
read by minilora.models.families) Qwen3, Gemma-2, Gemma-3 text and Phi-3/4. The field names
are transformers' names, so a config.json reads straight in:

    >>> cfg = ModelConfig.from_json("SmolLM2-135M/config.json")
    >>> cfg.hidden_size, cfg.num_key_value_heads, cfg.rope_type
    (576, 3, 'default')

RoPE parameters come in two spellings and both are read:
- transformers v4 (most hub checkpoints): ``rope_theta`` plus ``rope_scaling = {"type" | "rope_type": ...,
  "factor": ...}`` (``None`` for plain RoPE);
- transformers v5: ``rope_parameters = {"rope_type": ..., "rope_theta": ..., "factor": ...}``.
They are normalised into ``rope_theta``, ``rope_type`` and ``rope_scaling`` (the extra scaling numbers).
Supported rope types: ``default``, ``linear`` (Position Interpolation, Chen et al. 2023), ``llama3``
(Llama 3.1's frequency-dependent interpolation) and ``longrope`` (Phi-3); Gemma-3's per-layer-type
``rope_parameters`` give the global layers' RoPE here and the local base to the family reader.

Differences between the three families are data, not subclasses:
- Qwen2 has biases on q/k/v but not on o (``attention_bias=True, o_proj_bias=False``);
- Mistral (and Qwen2 with ``use_sliding_window``) attend within a sliding window: ``layer_sliding_windows``
  gives the window of each layer, ``None`` for full attention.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from minilora.errors import ConfigError
from minilora.models.families import FAMILY_DEFAULTS, family_fields

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# Defaults transformers uses when a key is absent from config.json, per model_type.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "sliding_window": 4096,
    },
    "qwen2": {"rope_theta": 10000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}

# Sizes that must be positive integers: zero or negative ones describe no model (a zero vocabulary, no layers).
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "half": torch.float16,
}


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (names as in transformers' config.json)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (and on o unless o_proj_bias says otherwise)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # factor, low/high_freq_factor, ...
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in ("bfloat16", ...)
    quantization_config: dict[str, Any] | None = None
    # Family pieces (minilora.models.families reads them from each family's config.json keys).
    hidden_act: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma-3)
    norm_unit_offset: bool = False  # Gemma's RMSNorm: x_hat * (1 + weight), multiplied in float32
    sandwich_norm: bool = False  # Gemma-2/3: norms after attention and MLP too (4 per layer)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the compute dtype
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # Gemma-2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma-2: logits -> cap * tanh(logits / cap)
    fused_qkv: bool = False  # Phi-3: one qkv_proj, rows [q | k | v]
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, rows [gate | up]
    partial_rotary_factor: float = 1.0  # the fraction of each head RoPE turns (Phi-3/4)
    rope_local_theta: float | None = None  # Gemma-3: sliding layers' RoPE base (plain RoPE)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # config.json as read, for round trips

    def __post_init__(self) -> None:
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps!r}: must be a positive finite number")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta={self.rope_theta!r}: must be a positive finite number")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"rotary dimension int(head_dim={self.head_dim} * partial_rotary_factor="
                f"{self.partial_rotary_factor}) = {self.rotary_dim} must be even and positive"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers={self.num_hidden_layers}"
            )

    # ------------------------------------------------------------------ derived facts
    @property
    def dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype as a torch.dtype, or None when config.json does not say."""
        return _DTYPES.get(self.torch_dtype) if self.torch_dtype else None

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head RoPE rotates (all unless ``partial_rotary_factor`` < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: 1/sqrt(query_pre_attn_scalar) for Gemma, else 1/sqrt(head_dim)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def layer_local_rope(self) -> list[bool]:
        """Whether each layer uses the local RoPE base (Gemma-3's sliding layers)."""
        if self.rope_local_theta is None:
            return [False] * self.num_hidden_layers
        return [t == "sliding_attention" for t in (self.layer_types or ["full_attention"] * self.num_hidden_layers)]

    @property
    def layer_sliding_windows(self) -> list[int | None]:
        """The attention window of each layer (None = full causal attention)."""
        if self.sliding_window is None:
            return [None] * self.num_hidden_layers
        if self.layer_types is None:
            return [self.sliding_window] * self.num_hidden_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a config.json file (or the config.json inside a directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not valid UTF-8 JSON: {e}") from e
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Build from a config.json dictionary; ``source`` names the file in error messages (ConfigError)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if model_type in FAMILY_DEFAULTS:
            defaults = FAMILY_DEFAULTS[model_type]
        else:
            act = data.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
            defaults = _FAMILY_DEFAULTS[model_type]

        def get(key: str, default: Any = None) -> Any:
            value = data.get(key)
            return defaults.get(key, default) if value is None else value

        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if data.get(k) is None
        ]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        try:
            hidden, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: hidden_size / num_attention_heads must be integers ({e})") from e

        rope_theta, rope_type, rope_scaling = _read_rope(data, defaults["rope_theta"], source)

        family: dict[str, Any] = {}
        if model_type in FAMILY_DEFAULTS:
            family = family_fields(model_type, data, source)
            attention_bias, o_proj_bias = family.pop("attention_bias"), family.pop("o_proj_bias")
            sliding_window, layer_types = family.pop("sliding_window"), family.pop("layer_types")
        elif model_type == "qwen2":
            # Qwen2 always has q/k/v biases and never an o bias; a window only with use_sliding_window.
            attention_bias, o_proj_bias = True, False
            sliding_window = data.get("sliding_window") if data.get("use_sliding_window", False) else None
            layer_types = data.get("layer_types")
            if sliding_window is not None and layer_types is None:
                first = data.get("max_window_layers", 28)
                n = int(data["num_hidden_layers"])
                layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        else:
            attention_bias = bool(data.get("attention_bias", False))
            o_proj_bias = attention_bias
            # An explicit null means full attention (Mistral 7B v0.2+); an absent key, the default window.
            sliding_window = data.get("sliding_window", defaults["sliding_window"]) if model_type == "mistral" else None
            layer_types = data.get("layer_types") if model_type == "mistral" else None

        try:
            return cls(
                model_type=model_type,
                vocab_size=int(data["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(data["intermediate_size"]),
                num_hidden_layers=int(data["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(get("num_key_value_heads", heads)),
                head_dim=int(data.get("head_dim") or defaults.get("head_dim") or (hidden // heads if heads > 0 else 0)),
                rms_norm_eps=float(get("rms_norm_eps")),
                max_position_embeddings=int(get("max_position_embeddings")),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
                attention_bias=attention_bias,
                o_proj_bias=o_proj_bias,
                mlp_bias=bool(data.get("mlp_bias", False)),
                rope_theta=rope_theta,
                rope_type=rope_type,
                rope_scaling=rope_scaling,
                sliding_window=None if sliding_window is None else int(sliding_window),
                layer_types=layer_types,
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
                pad_token_id=data.get("pad_token_id"),
                torch_dtype=data.get("torch_dtype") or data.get("dtype"),
                quantization_config=data.get("quantization_config"),
                raw=dict(data),
                **family,
            )
        except (TypeError, ValueError) as e:  # a size that is no number, or a check of __post_init__
            raise ConfigError(f"{source}: {e}") from e

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """A config.json dictionary transformers can read (v4 and v5 rope keys both written)."""
        out = dict(self.raw)
        if self.model_type in FAMILY_DEFAULTS:
            return self._family_to_dict(out)
        names = [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in ("raw", "rope_scaling", "rope_type") and f.name not in _FAMILY_FIELDS
        ]
        for name in names:
            out[name] = getattr(self, name)
        out["dtype"] = out.pop("torch_dtype")
        if self.quantization_config is None:
            out.pop("quantization_config")
        if self.model_type == "qwen2":
            out.pop("attention_bias")
            out["use_sliding_window"] = self.sliding_window is not None
        out.pop("o_proj_bias")
        if self.model_type == "llama":
            out.pop("sliding_window")
        if self.layer_types is None:
            out.pop("layer_types")  # transformers reads a mistral config with layer_types as "ministral"
        out["hidden_act"] = "silu"
        scaling = None if self.rope_type == "default" else {"rope_type": self.rope_type, **self.rope_scaling}
        out["rope_scaling"] = scaling
        out["rope_parameters"] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            **self.rope_scaling,
        }
        return out

    def _family_to_dict(self, out: dict[str, Any]) -> dict[str, Any]:
        """Qwen3 / Gemma / Phi-3: config.json as read, with the generic fields as they are now.

        The family switches are implied by model_type and the RoPE keys stay as the file spelled them
        (Gemma-3's per-layer-type ``rope_parameters``, Phi-3's longrope lists).
        """
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            out[name] = getattr(self, name)
        out.update(
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=self.torch_dtype,
        )
        out.pop("torch_dtype", None)
        if self.quantization_config is None:
            out.pop("quantization_config", None)
        else:
            out["quantization_config"] = self.quantization_config
        return out

    def to_json_bytes(self) -> bytes:
        """config.json's content, UTF-8."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    def to_json(self, path: str | os.PathLike) -> None:
        """Write config.json atomically."""
        from minilora.io.safe_write import atomic_write_bytes

        atomic_write_bytes(os.fspath(path), self.to_json_bytes())


# Fields that only minilora.models.families sets; to_dict never writes them (transformers derives them).
_FAMILY_FIELDS = (
    "hidden_act",
    "qk_norm",
    "norm_unit_offset",
    "sandwich_norm",
    "scale_embeddings",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "fused_qkv",
    "fused_gate_up",
    "partial_rotary_factor",
    "rope_local_theta",
)


def _read_rope(data: dict[str, Any], default_theta: float, source: str) -> tuple[float, str, dict[str, Any]]:
    """Normalise v4 ``rope_theta``/``rope_scaling`` and v5 ``rope_parameters`` into (theta, type, extras)."""
    params = data.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        # Per layer type (Gemma-3): the global layers' entry is the model's RoPE; the sliding layers'
        # base is read by minilora.models.families (rope_local_theta).
        if set(params) - {"full_attention", "sliding_attention"}:
            raise ConfigError(f"{source}: per-layer-type rope_parameters with unknown layer types: {params!r}")
        params = params.get("full_attention") or {}
    scaling = data.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    merged: dict[str, Any] = {}
    merged.update(scaling or {})
    merged.update(params or {})  # v5 spelling wins where both are present
    theta = merged.pop("rope_theta", None) or data.get("rope_theta") or default_theta
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    merged.pop("partial_rotary_factor", None)  # a head-split setting, read by minilora.models.families
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type in ("linear", "llama3") and "factor" not in merged:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", data.get("max_position_embeddings"))
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if merged.get(key) is None:
                raise ConfigError(f"{source}: rope type 'llama3' needs {key!r}")
    if rope_type == "longrope":
        # Phi-3 keeps the pre-training context outside rope_scaling; that one wins (as in transformers).
        original = data.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
        # transformers' Phi3Config default for both is 4096
        merged["original_max_position_embeddings"] = int(original or data.get("max_position_embeddings") or 4096)
        for key in ("short_factor", "long_factor"):
            if not isinstance(merged.get(key), list):
                raise ConfigError(f"{source}: rope type 'longrope' needs a list {key!r}, got {merged.get(key)!r}")
    if rope_type == "default":
        merged = {}
    return float(theta), rope_type, merged
