"""Generation: greedy equals transformers' generate, seeded sampling repeats, EOS stops, streaming = batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minilora.generate import (
    SamplingConfig,
    generate,
    generate_text,
    greedy_batch,
    stream_text,
    stream_tokens,
    top_p_filter,
)


@pytest.fixture(scope="module")
def models(hf_tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    from minilora.loading import from_pretrained

    hf = LlamaForCausalLM.from_pretrained(hf_tiny_llama_dir).eval()
    return hf, from_pretrained(hf_tiny_llama_dir)


@pytest.fixture(scope="module")
def tok():
    from minilora.testing.tiny import byte_tokenizer

    return byte_tokenizer()


def test_greedy_matches_transformers_generate(models):
    hf, ours = models
    prompt = [256, 72, 101, 108, 108, 111, 32, 119]
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=258)[
        0, len(prompt) :
    ].tolist()
    got = generate(ours, prompt, SamplingConfig(max_new_tokens=24))
    assert got == ref
    # batched greedy (left padding, one cache) gives each prompt's own continuation
    short = [256, 65, 66]
    ref_short = hf.generate(
        torch.tensor([short]), do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=258
    )[0, len(short) :].tolist()
    assert greedy_batch(ours, [prompt, short], 24, eos_token_id=None, pad_token_id=258) == [ref, ref_short]


def test_sampling_is_reproducible_with_a_seed(models):
    _, ours = models
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=123)
    a = generate(ours, [256, 1, 2, 3], cfg)
    b = generate(ours, [256, 1, 2, 3], cfg)
    c = generate(ours, [256, 1, 2, 3], SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7))
    assert a == b
    assert a != c
    assert a != generate(ours, [256, 1, 2, 3], SamplingConfig(max_new_tokens=20))  # not the greedy text


def test_top_p_keeps_the_same_nucleus_as_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for p in (0.1, 0.5, 0.9):
        ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
        ours = top_p_filter(logits, p)
        assert torch.equal(torch.isinf(ref), torch.isinf(ours)), p


def test_eos_and_stop_ids_end_generation(models):
    _, ours = models
    prompt = [256, 10, 20, 30]
    free = generate(ours, prompt, SamplingConfig(max_new_tokens=12))
    stop = free[4]
    first = free.index(stop)
    out = generate(ours, prompt, SamplingConfig(max_new_tokens=12), eos_token_id=stop)
    assert out == free[: first + 1]  # the stop id is returned, nothing after it
    out2 = generate(ours, prompt, SamplingConfig(max_new_tokens=12, stop_ids=(stop,)))
    assert out2 == out
    assert generate(ours, prompt, SamplingConfig(max_new_tokens=3)) == free[:3]


def test_streaming_yields_the_same_text_as_non_streaming(models, tok):
    _, ours = models
    cfg = SamplingConfig(max_new_tokens=30, temperature=0.8, seed=5)
    pieces = list(stream_text(ours, tok, "Hello", cfg))
    assert len(pieces) > 1
    ids = [t for t in generate(ours, tok.encode("Hello"), cfg) if t != tok.eos_token_id]
    assert "".join(pieces) == tok.decode(ids) == generate_text(ours, tok, "Hello", cfg)
    # the token stream is lazy: the first token arrives before the rest are computed
    it = stream_tokens(ours, tok.encode("Hello"), SamplingConfig(max_new_tokens=30))
    assert isinstance(next(it), int)


def test_bad_settings_are_refused(models):
    _, ours = models
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    for temperature in (-0.5, float("nan"), float("inf")):  # NaN would sample from NaN probabilities
        with pytest.raises(ValueError, match="temperature"):
            SamplingConfig(temperature=temperature)
    for count in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            SamplingConfig(max_new_tokens=count)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(ours, [])
    with pytest.raises(ValueError, match="positions"):
        generate(ours, [1] * 250, SamplingConfig(max_new_tokens=10))
