"""Decoding one token as one CUDA graph: a static KV cache, compiled blocks, the graph replayed per token.

Batch-1 decoding of a 4-bit model reads every weight once per token (4.65 GB for Llama-3.1-8B in NF4+DQ)
and does little arithmetic: at the card's bandwidth a token could take ~1.5 ms. Launched op by op from
Python it takes ~70 ms, because each of the ~3,000 kernels of a token waits for the host. gpt-fast's
remedy, followed here:

    prefill (eager)   the prompt fills a StaticKVCache (minilora.models.llama): fixed-size buffers whose
                      next slot and positions live in device tensors
    step (a graph)    embed the last token -> every layer -> norm -> head -> float logits in a static
                      buffer, compiled as one function (norms, rotary and SwiGLU fused, each op rounded as
                      eager rounds it: EAGER_NUMERICS; 4-bit weights through the GEMV kernel), recorded
                      once; each token is then one replay, which also advances the cache
    pick (eager)      argmax, or temperature / top-p sampling from a seeded generator on the GPU
                      (minilora.generate.pick_next), then the token is copied into the graph's input

LoRA adapters, merged or not, are ordinary modules inside the layers and are recorded with them. The
reference is minilora.generate's loop over KVCache; tests check both give the same greedy tokens.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from minilora.models.llama import StaticKVCache

logger = logging.getLogger(__name__)

# Inductor, told to round as eager PyTorch does: each bf16 op's result rounded to bf16 (no fused float32 chains,
# no fused multiply-add), float32 division correctly rounded (Triton's `/` is div.full, approximate; eager's is
# IEEE), denormals kept, the CUDA toolkit's libdevice. Greedy decoding breaks exact bf16 logit ties by the
# last bit, so the compiled token must compute the reference loop's bits, not merely close ones (issue 16;
# benchmarks/gpu/NOTES.md: with the default options SmolLM2 parted from the loop at ties on 3 of 4 prompts).
EAGER_NUMERICS = {
    "emulate_precision_casts": True,
    "eager_numerics.division_rounding": True,  # Inductor of torch 2.13; older ones lack the last two knobs
    "eager_numerics.disable_ftz": True,
}


def known_options(options: dict) -> dict:
    """The options the installed Inductor knows (torch.compile refuses any other); the rest logged, not passed."""
    from torch._inductor import config

    known = config.get_config_copy()
    if missing := [k for k in options if k not in known]:
        logger.info("this torch's Inductor lacks %s: the compiled token may round unlike eager there", missing)
    return {k: v for k, v in options.items() if k in known}


def last_logits(
    model: nn.Module, cache: StaticKVCache, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ids (B, T) through the decoder into the cache; float32 logits (B, V) of the last position."""
    hidden = model.model(ids, attention_mask=attention_mask, cache=cache)  # (B, T, C)
    return model.head(hidden[:, -1]).float()  # (B, V), final soft-cap included


class GraphDecoder:
    """Prefill a prompt, then decode token by token with one CUDA-graph replay each (batch B, fixed max_len).

    >>> dec = GraphDecoder(model, batch_size=1, max_len=prompt_len + 256)   # doctest: +SKIP
    >>> logits = dec.prefill(prompt_ids)              # (B, V) of the prompt's last position
    >>> logits = dec.step(next_ids)                   # (B, V) of the new token, one graph replay
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_len: int,
        compile: bool = True,
        compile_options: dict | None = None,  # Inductor's options; None: EAGER_NUMERICS
    ) -> None:
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise ValueError(f"GraphDecoder needs a CUDA model, this one is on {param.device}")
        if not (hasattr(model, "model") and hasattr(model, "lm_head")):
            raise ValueError(f"GraphDecoder needs a minilora decoder (.model, .lm_head), got {type(model).__name__}")
        self.model = model
        dtype = model.model.embed_tokens.weight.dtype
        self.cache = StaticKVCache(model.config, batch_size, max_len, dtype=dtype, device=param.device)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=param.device)  # the graph's input
        self.logits: torch.Tensor | None = None  # the graph's output (B, V) float32
        self.graph: torch.cuda.CUDAGraph | None = None
        # One trace of the whole token (the 32 layers inlined): each layer's cache index is a constant of it.
        self._token_forward = self._forward
        if compile:
            options = known_options(EAGER_NUMERICS if compile_options is None else compile_options)
            self._token_forward = torch.compile(self._forward, dynamic=False, options=options)

    def _forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return last_logits(self.model, self.cache, ids, attention_mask)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the cache and run the (left-padded) prompt ids (B, T); logits (B, V) of its last position."""
        if ids.shape[1] >= self.cache.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens leaves no room in a cache of {self.cache.max_len}")
        self.cache.reset()
        return self._forward(ids, attention_mask)

    def _capture(self) -> None:
        state = (self.cache.slot.clone(), self.cache.next_pos.clone(), self.cache.valid.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compile, autotune, allocate, outside the capture
            for _ in range(3):
                self._token_forward(self.token)
        torch.cuda.current_stream().wait_stream(stream)
        for t, saved in zip((self.cache.slot, self.cache.next_pos, self.cache.valid), state, strict=True):
            t.copy_(saved)  # the warm-up leaves no trace in the cache
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._token_forward(self.token)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,) or (B, 1); logits (B, V) of it (a view of the graph's buffer)."""
        self.token.copy_(ids.reshape(self.token.shape))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
