"""Text generation with the KV cache: greedy or sampled (temperature, top-p), streaming, stop tokens.

Decoding is the autoregressive loop of GPT-2 (Radford et al. 2019), with keys and values of past
positions kept in a pre-allocated cache (minilora.models.llama.KVCache) so each new token costs one
position, not the whole sequence:

    prefill:  logits = model(prompt, cache)            # cache holds the prompt's k/v
    repeat:   next = pick(logits[-1]);  yield next;  logits = model([next], cache)

pick = argmax (greedy, ``temperature=0``), or a sample from softmax(logits / temperature) restricted to
the smallest set of tokens whose probability mass reaches ``top_p`` (nucleus sampling, Holtzman et al.
2020, section 3.1). Sampling draws from a ``torch.Generator`` seeded by ``seed``, so a seed reproduces
the text. Generation stops after ``max_new_tokens`` or at the first EOS / stop id (which is returned but
not decoded into the text).

Only the last position's hidden state goes through the output head: the prompt's other logits are
never used, and with a large vocabulary the head is a large share of a small model's cost.

On CUDA, by default (``SamplingConfig.fast``), each new token is one replay of a CUDA graph over a static
cache (minilora.decode.GraphDecoder, compiled once per model and cache size); the loop below is the
reference it is tested against, and what runs everywhere else.

    >>> for piece in stream_text(model, tokenizer, "Price is $", max_new_tokens=8):   # doctest: +SKIP
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from minilora.models.llama import KVCache


@dataclass
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    fast: bool = True  # on CUDA: one CUDA graph per token (minilora.decode); False: the reference loop

    def __post_init__(self) -> None:
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _last_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last position, filling the cache; only that position meets the output head."""
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(ids, attention_mask=mask, cache=cache)  # (B, T, C)
        last = hidden[:, -1]  # (B, C)
        return (model.head(last) if hasattr(model, "head") else model.lm_head(last)).float()  # head: + soft-cap
    return model(ids, attention_mask=mask, cache=cache)[:, -1].float()


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the nucleus: the smallest top set with probability >= top_p.

    The most likely token is always kept. Works on (..., V).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the mass BEFORE it already reaches top_p
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids: argmax, or a temperature / top-p sample."""
    if config.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = F.softmax(top_p_filter(logits / config.temperature, config.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """The one decoding loop: yield the next ids (B,) picked from ``logits`` (B, V), then ask ``step`` for the
    logits after them, at most ``config.max_new_tokens`` times. The caller stops it early (``break``)."""
    for i in range(config.max_new_tokens):
        next_ids = pick_next(logits, config, generator)  # (B,)
        yield next_ids
        if i == config.max_new_tokens - 1:
            return
        logits = step(next_ids)


def _new_cache(model: nn.Module, batch_size: int, max_len: int) -> KVCache:
    param = next(model.parameters())
    dtype = model.model.embed_tokens.weight.dtype if hasattr(model, "model") else param.dtype
    return KVCache(model.config, batch_size, max_len, dtype=dtype, device=param.device)


def _cached_step(model: nn.Module, cache: KVCache, mask: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``step`` for :func:`decode_loop`: (B,) new ids -> the logits (B, V) after them, the mask grown by one."""

    def step(next_ids: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, S + 1)
        return _last_logits(model, next_ids[:, None], mask, cache)

    return step


def _stop_set(eos_token_id: int | Sequence[int] | None, config: SamplingConfig) -> set[int]:
    stops = set(config.stop_ids)
    if isinstance(eos_token_id, int):
        stops.add(eos_token_id)
    elif eos_token_id is not None:
        stops.update(int(e) for e in eos_token_id)
    return stops


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    config: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one as they are produced (batch of one). A stop id is yielded, then it ends."""
    config = config or SamplingConfig()
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)  # (1, T)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: at least one token (e.g. BOS) is needed")
    param = next(model.parameters())
    ids = ids.to(param.device)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total = ids.shape[1] + config.max_new_tokens
    if max_pos is not None and total > max_pos:
        raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({config.max_new_tokens}) > {max_pos} positions")
    generator = None
    if config.temperature > 0:
        generator = torch.Generator(device=param.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    stops = _stop_set(eos_token_id, config)
    was_training = model.training
    model.eval()
    decoder = _graph_decoder(model, total) if config.fast and param.device.type == "cuda" else None
    try:
        if decoder is not None:
            logits = decoder.prefill(ids)
            step = decoder.step
        else:
            cache = _new_cache(model, 1, total)
            logits, step = _last_logits(model, ids, None, cache), _cached_step(model, cache, None)

        for next_id in decode_loop(logits, step, config, generator):  # (1,), on the device
            token = int(next_id[0])
            yield token
            if token in stops:
                return
    finally:
        model.train(was_training)


def _graph_decoder(model: nn.Module, total: int):  # -> minilora.decode.GraphDecoder
    """The model's graph decoder for caches of ``total`` positions (rounded up to 256: few sizes, few compiles)."""
    from minilora.decode import GraphDecoder

    max_len = -(-total // 256) * 256
    # A graph reads tensors at the addresses it was captured with: a swapped module or tensor (add_lora,
    # merge, a reload) makes another model, which gets a new decoder.
    tensors = (*model.parameters(), *model.buffers())
    key = (max_len, tuple(id(m) for m in model.modules()), tuple(t.data_ptr() for t in tensors))
    decoders = model.__dict__.setdefault("_minilora_graph_decoders", {})
    if key not in decoders:
        for stale in [k for k in decoders if k[1:] != key[1:]]:
            del decoders[stale]
        decoders[key] = GraphDecoder(model, batch_size=1, max_len=max_len)
    return decoders[key]


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    config: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[int]:
    """The new token ids (a stop id, if reached, is the last one); ``callback`` sees each as it comes."""
    out = []
    for token in stream_tokens(model, prompt_ids, config, eos_token_id):
        out.append(token)
        if callback is not None:
            callback(token)
    return out


def stream_text(
    model: nn.Module,
    tokenizer: object,
    prompt: str,
    config: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> Iterator[str]:
    """Yield the generated text piece by piece; the pieces join to ``generate_text``'s result.

    Each piece is the growth of ``decode(new tokens so far)``; a piece ending in an incomplete UTF-8
    character (decoded as U+FFFD) is held back until the next token completes it. Stop ids are not decoded.
    """
    config = config or SamplingConfig()
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id  # type: ignore[attr-defined]
    stops = _stop_set(eos, config)
    ids = tokenizer.encode(prompt)  # type: ignore[attr-defined]
    new: list[int] = []
    emitted = ""
    for token in stream_tokens(model, ids, config, eos):
        if token in stops:
            break
        new.append(token)
        text = tokenizer.decode(new)  # type: ignore[attr-defined]
        if text.endswith("\ufffd"):
            continue
        if text.startswith(emitted):
            piece, emitted = text[len(emitted) :], text
            if piece:
                yield piece
    text = tokenizer.decode(new)  # type: ignore[attr-defined]
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted) :]


def generate_text(  # stream_text's signature: the same call, joined
    model: nn.Module,
    tokenizer: object,
    prompt: str,
    config: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> str:
    """The generated continuation of ``prompt`` as text (stop ids excluded)."""
    return "".join(stream_text(model, tokenizer, prompt, config, eos_token_id))


@torch.no_grad()
def greedy_batch(
    model: nn.Module,
    prompts: Iterable[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    adapter_names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Greedy continuations of several prompts at once (left padding, one shared cache).

    Returns each prompt's new ids, cut after its first stop id (included). One batched forward per new
    token instead of one per prompt: with a quantized base, each forward rebuilds every weight, so
    batching divides that cost by the batch size. adapter_names: prompt i decodes with adapter
    adapter_names[i] ("__base__": none), peft's mixed-adapter batch (minilora.lora.mixed_batch).
    """
    prompts = [list(p) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("greedy_batch needs at least one prompt and no empty prompt")
    param = next(model.parameters())
    device = param.device
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, device=device)
        mask[i, T - len(p) :] = 1
    stops = _stop_set(eos_token_id, SamplingConfig())
    cache = _new_cache(model, B, T + max_new_tokens)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    rows = contextlib.nullcontext()
    if adapter_names is not None:
        from minilora.lora.multi import mixed_batch

        if len(adapter_names) != B:
            raise ValueError(f"greedy_batch: {len(adapter_names)} adapter names for {B} prompts")
        rows = mixed_batch(model, adapter_names)
    try:
        with rows:
            logits = _last_logits(model, ids, mask, cache)
            for nxt in decode_loop(logits, _cached_step(model, cache, mask), SamplingConfig(max_new_tokens)):
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        out[i].append(t)
                        done[i] = t in stops
                if all(done):
                    break
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding of a (B, T) batch: returns (B, T + n) token ids, n <= max_new_tokens.

    Like transformers' ``generate(do_sample=False)``: a sequence that produced ``eos_token_id`` is padded
    with ``pad_token_id`` (default: the eos id) and decoding stops once every sequence has finished.
    """
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    cache = _new_cache(model, B, T + max_new_tokens)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = [input_ids]
    logits = _last_logits(model, input_ids, mask, cache)
    for nxt in decode_loop(logits, _cached_step(model, cache, mask), SamplingConfig(max_new_tokens)):
        if eos_token_id is not None:
            nxt.copy_(torch.where(finished, torch.full_like(nxt, pad), nxt))  # in place: fed back as is
            finished = finished | (nxt == eos_token_id)
        tokens.append(nxt[:, None])
        if eos_token_id is not None and bool(finished.all()):
            break
    return torch.cat(tokens, dim=1)
