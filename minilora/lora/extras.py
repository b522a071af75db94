"""What peft trains besides low-rank adapters: whole modules (`modules_to_save`) and single token rows
(`trainable_token_indices`), each per named adapter, with peft's module names and saved keys.

    modules_to_save=["lm_head"]      lm_head -> ModulesToSave(original_module = the frozen head,
                                                modules_to_save = {adapter: a trainable copy})
        saved as  base_model.model.lm_head.weight                         (the copy's own keys)

    trainable_token_indices=[3, 5]   embed_tokens -> TrainableTokens(token_adapter.base_layer = the embedding,
                                                token_adapter.trainable_tokens_delta = {adapter: rows [n, C]})
        saved as  base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta   [n, C]

The "delta" holds the new rows themselves, not a difference (peft's choice): the forward writes them
over the frozen rows, E' = E.index_copy(0, indices, rows), and looks up E'. They start as the current
rows, so the model is unchanged on step 0; only the listed rows get gradients (new tokens of a
resized vocabulary, e.g. a chat template's special tokens).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from minilora.errors import AdapterError


class ModulesToSave(nn.Module):
    """A frozen module plus one trainable full copy per adapter; the active copy (if any) runs."""

    def __init__(self, original: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disabled = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise AdapterError(f"modules_to_save: adapter {name!r} already exists on this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's tensors under the original module's own names (peft saves `lm_head.weight`)."""
        return dict(self.modules_to_save[name].state_dict()) if name in self.modules_to_save else {}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.original_module.state_dict().items()}

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.modules_to_save[name].load_state_dict(tensors)

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    def unwrapped(self) -> nn.Module:
        """The module the model would hold with the active adapter merged: its copy, or the original."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]


class TokenAdapter(nn.Module):
    """The embedding plus, per adapter, the new values of a few of its rows."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}


class TrainableTokens(nn.Module):
    """An nn.Embedding whose rows `token_indices` train, per adapter (peft's TrainableTokensWrapper)."""

    def __init__(self, embedding: nn.Embedding, adapter_name: str, token_indices: list[int]) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise AdapterError(f"trainable_token_indices needs an nn.Embedding, got {type(embedding).__name__}")
        self.token_adapter = TokenAdapter(embedding)
        self.active_adapter = adapter_name
        self.disabled = False
        self.add_adapter(adapter_name, token_indices)

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.base_layer.weight

    def add_adapter(self, name: str, token_indices: list[int]) -> None:
        n = self.weight.shape[0]
        bad = [i for i in token_indices if not 0 <= int(i) < n]
        if bad or not token_indices:
            raise AdapterError(f"trainable_token_indices {token_indices!r}: need indices in [0, {n}), bad {bad}")
        rows = self.weight.detach()[torch.tensor(token_indices, device=self.weight.device)].clone()  # (n, C)
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(rows)
        self.token_adapter.token_indices[name] = [int(i) for i in token_indices]

    def merged_weight(self) -> torch.Tensor:
        """E with the active adapter's rows written over the frozen ones."""
        name = self.active_adapter
        if self.disabled or name not in self.token_adapter.trainable_tokens_delta:
            return self.weight
        rows = self.token_adapter.trainable_tokens_delta[name]
        index = torch.tensor(self.token_adapter.token_indices[name], device=self.weight.device)
        return self.weight.index_copy(0, index, rows.to(self.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.token_adapter.base_layer
        return F.embedding(ids, self.merged_weight(), emb.padding_idx, emb.max_norm, emb.norm_type)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        deltas = self.token_adapter.trainable_tokens_delta
        return [deltas[name]] if name in deltas else []

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        deltas = self.token_adapter.trainable_tokens_delta
        return {"token_adapter.trainable_tokens_delta": deltas[name]} if name in deltas else {}

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.token_adapter.trainable_tokens_delta[name].copy_(tensors["token_adapter.trainable_tokens_delta"])

    def delete_adapter(self, name: str) -> None:
        del self.token_adapter.trainable_tokens_delta[name]
        del self.token_adapter.token_indices[name]

    def unwrapped(self) -> nn.Embedding:
        emb = self.token_adapter.base_layer
        out = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=emb.weight.device)
        out.weight = nn.Parameter(self.merged_weight().detach().clone(), requires_grad=False)
        return out


FullModule = ModulesToSave | TrainableTokens


def extra_modules(model: nn.Module) -> list[tuple[str, FullModule]]:
    """(full name, wrapper) of every ModulesToSave / TrainableTokens in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ModulesToSave, TrainableTokens))]


def _matches(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def input_embedding_name(model: nn.Module) -> str:
    """The full name of the model's input embedding (get_input_embeddings(), else `embed_tokens`)."""
    get = getattr(model, "get_input_embeddings", None)
    target = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is target or (target is None and name.split(".")[-1] == "embed_tokens"):
            return name
    raise AdapterError("trainable_token_indices: the model has no input embedding (embed_tokens)")


def token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]] | None) -> dict[str, list[int]]:
    """{embedding module name: indices} for peft's trainable_token_indices (a list: the input embedding)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        names = [n for n, _ in model.named_modules()]
        out = {}
        for key, indices in spec.items():
            found = [n for n in names if _matches([key], n) and not n.endswith(".base_layer")]
            if not found:
                raise AdapterError(f"trainable_token_indices: no module named {key!r}")
            out.update({n: list(indices) for n in found})
        return out
    return {input_embedding_name(model): list(spec)}


def save_targets(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Full names of the modules `modules_to_save` trains in full (a wrapper already there counts)."""
    if not modules_to_save:
        return []
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, ModulesToSave):
            inside.append(name)
        if name and _matches(list(modules_to_save), name):
            out.append(name)
    if not out:
        raise AdapterError(f"modules_to_save={modules_to_save!r} matched no module of the model")
    return out
