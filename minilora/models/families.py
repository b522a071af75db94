"""What Qwen3, Gemma-2, Gemma-3 and Phi-3 change in the Llama block, read from their config.json keys.

Every family runs the one decoder in minilora.models.llama; a family is a set of switches on
:class:`~minilora.models.config.ModelConfig`, filled in here from transformers' key names and defaults:

| family (model_type)     | switches                                                                      |
|-------------------------|-------------------------------------------------------------------------------|
| Qwen3 (qwen3)           | q/k RMSNorm per head; head_dim from config (default 128); no qkv bias         |
| Gemma-2 (gemma2)        | GeGLU (tanh GELU); RMSNorm x(1 + w); 4 norms per layer; embeddings x sqrt(C); |
|                         | scale 1/sqrt(query_pre_attn_scalar); attention and final logit soft-caps;      |
|                         | sliding window on every other layer (0, 2, 4 ...)                             |
| Gemma-3 (gemma3_text)   | Gemma-2's (no attention soft-cap, as in transformers), plus q/k norms and a   |
|                         | local RoPE base (10k) on sliding layers (5 of every 6) beside the global (1M) |
| Phi-3 / Phi-4 (phi3)    | fused qkv_proj and gate_up_proj; partial RoPE; longrope scaling; an optional  |
|                         | sliding window on every layer                                                 |

This module only maps keys to values; of minilora it imports only the error type.
"""

from __future__ import annotations

from typing import Any

from minilora.errors import ConfigError

__all__ = ["FAMILY_DEFAULTS", "family_fields"]

# transformers' defaults for keys a config.json may omit (its configuration_*.py classes).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "head_dim": 128,
        "sliding_window": 4096,
    },
    "gemma2": {
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window_pattern": 2,
    },
    "gemma3_text": {
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "sliding_window": 4096,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {"rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}


def _get(data: dict[str, Any], model_type: str, key: str) -> Any:
    """data[key], or the family default when the key is absent (an explicit null stays None)."""
    return data[key] if key in data else FAMILY_DEFAULTS[model_type].get(key)


def _layer_types(data: dict[str, Any], n_layers: int, pattern: int, source: str) -> list[str]:
    """Gemma's layer types: given, or sliding except every ``pattern``-th layer (1-based)."""
    types = data.get("layer_types")
    if types is None:
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{source}: layer_types holds unknown types {sorted(unknown)}")
    return list(types)


def _partial_rotary_factor(data: dict[str, Any]) -> float:
    params = data.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(data.get("partial_rotary_factor") or 1.0)


def _activation(data: dict[str, Any], key: str, default: str) -> str:
    return data.get(key) or default


def family_fields(model_type: str, data: dict[str, Any], source: str) -> dict[str, Any]:
    """The ModelConfig fields one family's config.json implies (attention bias and windows included)."""
    n = int(data["num_hidden_layers"])
    out: dict[str, Any] = {"attention_bias": bool(data.get("attention_bias") or False)}
    out["o_proj_bias"] = out["attention_bias"]
    if model_type == "qwen3":
        window = _get(data, model_type, "sliding_window") if data.get("use_sliding_window", False) else None
        types = data.get("layer_types")
        if window is not None and types is None:
            first = data.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        out.update(
            hidden_act=_activation(data, "hidden_act", "silu"),
            qk_norm=True,
            sliding_window=window,
            layer_types=types if window is not None else None,
        )
    elif model_type in ("gemma2", "gemma3_text"):
        pattern = int(_get(data, model_type, "sliding_window_pattern"))
        types = _layer_types(data, n, pattern, source)
        window = _get(data, model_type, "sliding_window")
        out.update(
            hidden_act=_activation(data, "hidden_activation", "gelu_pytorch_tanh"),
            norm_unit_offset=True,
            sandwich_norm=True,
            scale_embeddings=True,
            query_pre_attn_scalar=float(_get(data, model_type, "query_pre_attn_scalar")),
            attn_logit_softcapping=_get(data, model_type, "attn_logit_softcapping"),
            final_logit_softcapping=_get(data, model_type, "final_logit_softcapping"),
            sliding_window=window,
            layer_types=types if window is not None else None,
        )
        if model_type == "gemma3_text":
            params = data.get("rope_parameters")
            local = (params or {}).get("sliding_attention") if isinstance(params, dict) else None
            if isinstance(local, dict):
                if local.get("rope_type", "default") != "default":
                    raise ConfigError(f"{source}: sliding_attention rope_type {local['rope_type']!r} is not supported")
                theta = local.get("rope_theta")
            else:
                theta = _get(data, model_type, "rope_local_base_freq")
            # transformers' Gemma-3 attention reads attn_logit_softcapping but never applies it: neither do we.
            out.update(qk_norm=True, rope_local_theta=float(theta or 10000.0), attn_logit_softcapping=None)
    elif model_type == "phi3":
        window = data.get("sliding_window")
        out.update(
            hidden_act=_activation(data, "hidden_act", "silu"),
            fused_qkv=True,
            fused_gate_up=True,
            partial_rotary_factor=_partial_rotary_factor(data),
            sliding_window=window,
            layer_types=None,
        )
    else:
        raise AssertionError(f"no family reader for {model_type!r}")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if out.get(cap) is not None:
            out[cap] = float(out[cap])
    return out
