"""The frozen input embedding in host memory (minilora.train.offload.embedding_on_host) and when train() takes it.

CPU: the swap leaves the logits and the parameters as they were and restores the very same nn.Embedding;
choose_path says why a tied, trained or non-CUDA embedding stays, and an explicit request for one is refused.
GPU (`pytest -m gpu tests/train/test_offload.py`): the default fast path reads the rows from pinned host memory
inside its CUDA graph, gives the losses of the run that keeps the table on the card, and peaks lower by about
the table's size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from minilora.kernels import last_implementation
from minilora.loading import from_pretrained
from minilora.lora import add_lora
from minilora.train import loop
from minilora.train.data import tokenize_records
from minilora.train.fast import choose_path
from minilora.train.offload import HostEmbedding, embedding_on_host
from minilora_demo.price import split_products


def _untied(tiny_dir: Path, device: str = "cpu") -> nn.Module:
    model = from_pretrained(tiny_dir, quantize="nf4").to(device)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # its own head: untied
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=0.0)
    return model


def _examples(byte_tok, n: int = 24) -> list:
    train_p, _, _ = split_products(n, 4, 0, seed=1)
    return tokenize_records([p.record() for p in train_p], byte_tok, max_length=160).examples


def test_the_swap_keeps_logits_and_parameters_and_restores_the_same_module(tiny_dir: Path) -> None:
    model = _untied(tiny_dir).eval()
    ids = torch.tensor([[5, 77, 101, 32, 250, 3]])
    emb, weight = model.model.embed_tokens, model.model.embed_tokens.weight.detach().clone()
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        before = model(ids)
        with embedding_on_host(model):
            assert isinstance(model.model.embed_tokens, HostEmbedding)
            assert "model.embed_tokens.weight" not in dict(model.named_parameters())  # the table is no parameter
            torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
            assert last_implementation("embedding_rows") == "reference"  # CPU ids: F.embedding
        assert model.model.embed_tokens is emb and torch.equal(emb.weight, weight)
        assert [n for n, _ in model.named_parameters()] == names
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def test_choose_path_says_why_the_embedding_stays(tiny_dir: Path, byte_tok) -> None:
    ex = _examples(byte_tok, 8)
    tied = from_pretrained(tiny_dir, quantize="nf4")  # the tiny model ties its head to the embedding
    add_lora(tied, r=4, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="tied to lm_head"):
        choose_path(tied, ex, loop.TrainConfig(host_embedding=True))
    model = _untied(tiny_dir)
    with pytest.raises(ValueError, match="host memory is the model's own on cpu"):
        choose_path(model, ex, loop.TrainConfig(host_embedding=True))
    assert not choose_path(model, ex, loop.TrainConfig()).host_embedding  # CPU: the eager loop, nothing moves
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="the input embedding is trained"):
        choose_path(model, ex, loop.TrainConfig(host_embedding=True))


@pytest.mark.gpu
def test_on_cuda_the_default_path_reads_the_embedding_from_host_memory(byte_tok, tmp_path: Path) -> None:
    from minilora.testing.tiny import make_tiny_model_dir

    vocab = 32768  # an 8 MB float32 table: its absence from the peak stands out of the allocator's rounding
    tiny_dir = make_tiny_model_dir(tmp_path / "model", seed=0, vocab_size=vocab)

    def run(**kw) -> tuple[loop.TrainResult, int]:
        model = _untied(tiny_dir, "cuda")
        config = loop.TrainConfig(output_dir=str(tmp_path / str(kw)), max_steps=8, batch_size=4, lr=1e-3,
                                  gradient_checkpointing=True, progress=False, plot=False, **kw)  # fmt: skip
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = loop.train(model, _examples(byte_tok), config)
        assert model.model.embed_tokens.weight.is_cuda  # back on the card after the run
        return result, torch.cuda.max_memory_allocated() - base

    card, card_peak = run(host_embedding=False)  # first: the process's one-off allocations land in this run
    assert "input embedding in host memory" not in card.path
    host, host_peak = run()
    assert "input embedding in host memory" in host.path and "whole step as one CUDA graph" in host.path
    assert last_implementation("embedding_rows") == "triton-host-gather"
    torch.testing.assert_close(torch.tensor(host.losses), torch.tensor(card.losses), rtol=1e-5, atol=1e-5)
    table = vocab * 64 * 4  # the float32 table (vocab x hidden)
    assert host_peak <= card_peak - table // 2, (host_peak, card_peak, table)
