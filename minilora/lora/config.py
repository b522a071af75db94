"""The LoRA configuration: which modules get adapters, with which rank and alpha.

One dataclass, `LoRAConfig`, holds what `add_lora` needs and what peft's `adapter_config.json` stores.
Field names follow minilora (`alpha`, `dropout`, `init`); `to_peft_dict` / `from_peft_dict` translate to
and from peft 0.21's JSON names (`lora_alpha`, `lora_dropout`, `init_lora_weights`), see
docs/formats.md section 5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minilora.errors import ConfigError
from minilora.lora.init import check_init

# peft's config fields that change the adapter's math or its files in ways minilora does not implement.
# Reading a config that sets any of them to a non-default value is refused rather than silently ignored.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "use_bdlora": None,
}

# What peft 0.21.2 writes for the fields minilora has no use for: written as-is so that the file reads
# exactly like one written by peft (same key set, same values).
_PEFT_PASSIVE_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "revision": None,
    "velora_config": None,
}

# The peft release whose adapter format minilora writes (peft fills `peft_version` with its own version).
PEFT_FORMAT_VERSION = "0.21.2"


@dataclass
class LoRAConfig:
    """Settings of one named adapter.

    target_modules: list of names (a module matches if its full name equals an entry or ends with
        "." + entry), a regex string that must fullmatch the full name, or "all-linear".
    rank_pattern / alpha_pattern: {regex: value}; a module whose full name matches `(.*\\.)?(regex)$`
        gets that r / alpha (first match wins).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    loftq_config: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got r={self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        check_init(self.init)
        if self.init == "loftq" and not self.loftq_config:
            self.loftq_config = {"loftq_bits": 4, "loftq_iter": 1}  # peft's LoftQConfig defaults
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # peft refuses this combination too: a regex already says which layers it wants.
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be used with a string "
                f"target_modules={self.target_modules!r}"
            )
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive int, got {value!r}")

    def to_peft_dict(self, resolved_targets: list[str] | None = None) -> dict[str, Any]:
        """The adapter_config.json content peft 0.21 writes for this config.

        resolved_targets: the full module names "all-linear" resolved to (peft writes those, not the
        shorthand).
        """
        target: list[str] | str = self.target_modules
        if isinstance(target, str) and target.lower() == "all-linear":
            assert resolved_targets is not None, "all-linear needs the resolved module names to be written"
            target = sorted(resolved_targets)
        elif isinstance(target, list):
            target = sorted(target)
        out: dict[str, Any] = dict(_PEFT_PASSIVE_FIELDS)
        out.update(_UNSUPPORTED_PEFT_FIELDS)
        out.update(
            {
                "alpha_pattern": dict(self.alpha_pattern),
                "base_model_name_or_path": self.base_model_name_or_path,
                "bias": "none",
                "exclude_modules": self.exclude_modules,
                "inference_mode": self.inference_mode,
                "init_lora_weights": True if self.init == "default" else self.init,
                "layers_pattern": self.layers_pattern,
                "layers_to_transform": self.layers_to_transform,
                "loftq_config": dict(self.loftq_config),
                "lora_alpha": self.alpha,
                "lora_dropout": self.dropout,
                "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
                "trainable_token_indices": self.trainable_token_indices,
                "peft_type": "LORA",
                "peft_version": PEFT_FORMAT_VERSION,
                "r": self.r,
                "rank_pattern": dict(self.rank_pattern),
                "target_modules": target,
                "task_type": self.task_type,
                "use_dora": self.use_dora,
                "use_rslora": self.use_rslora,
            }
        )
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoRAConfig:
        """Read peft's adapter_config.json content; unknown keys are ignored, unsupported settings refused."""
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type={peft_type!r}, only 'LORA' adapters are supported")
        bias = data.get("bias", "none")
        if bias != "none":
            raise ValueError(f"{source}: bias={bias!r}, only bias='none' is supported")
        for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
            value = data.get(key, default)
            if value not in (default, None, False, [], {}):
                raise ValueError(f"{source}: {key}={value!r} is not supported by minilora")
        if "r" not in data or "target_modules" not in data:
            raise ValueError(f"{source}: needs 'r' and 'target_modules', found keys {sorted(data)}")
        init = data.get("init_lora_weights", True)
        if init in (True, False):
            init = "default"
        try:
            check_init(init)
        except ConfigError as e:
            raise ConfigError(f"{source}: init_lora_weights={init!r} is not supported by minilora") from e
        target = data["target_modules"]
        return cls(
            r=int(data["r"]),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=sorted(target) if isinstance(target, (list, tuple, set)) else target,
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init=init,
            loftq_config=dict(data.get("loftq_config") or {}),
            modules_to_save=data.get("modules_to_save") or None,
            trainable_token_indices=data.get("trainable_token_indices") or None,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            task_type=data.get("task_type") or "CAUSAL_LM",
            inference_mode=bool(data.get("inference_mode", False)),
        )
