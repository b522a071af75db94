"""`train(config with cuda_graph=True)`: each optimizer step as a replayed CUDA graph.

On any machine: the padding to fixed shapes, and the graph step's loss function (device-side counts, every
position through the chunked head) gives the eager loop's loss and gradients, accumulation included; a
CPU model is refused. On CUDA (`pytest -m gpu tests/train/test_graph_training.py`): a graphed run follows
the eager run's loss curve, and a graphed run stopped and resumed equals one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minilora.loading import from_pretrained
from minilora.lora import add_lora
from minilora.train import loop
from minilora.train.data import IGNORE_INDEX, collate, tokenize_records
from minilora_demo.price import split_products


def _examples(byte_tok, n: int = 24) -> list:
    train_p, _, _ = split_products(n, 4, 0, seed=1)
    return tokenize_records([p.record() for p in train_p], byte_tok, max_length=160).examples


def _model(tiny_dir: Path, device: str, dropout: float):
    model = from_pretrained(tiny_dir, quantize="nf4").to(device)
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=dropout)
    return model


def test_padding_keeps_every_real_token_and_adds_no_labels(byte_tok) -> None:
    ex = _examples(byte_tok)
    micro = [collate(ex[0:3]), collate(ex[3:5])]  # 3 rows, then a short batch of 2
    ids, labels, mask = loop.pad_micro_batches(micro, rows=3, multiple=64, pad_token_id=7)
    longest = max(b.input_ids.shape[1] for b in micro)
    assert ids.shape == labels.shape == mask.shape == (2, 3, -(-longest // 64) * 64)
    for i, b in enumerate(micro):
        n, t = b.input_ids.shape
        assert torch.equal(ids[i, :n, :t], b.input_ids) and torch.equal(labels[i, :n, :t], b.labels)
        assert torch.equal(mask[i, :n, :t], b.attention_mask) and not mask[i, :n, t:].any()
        assert (ids[i, :n, t:] == 7).all()
    assert (labels[1, 2] == IGNORE_INDEX).all() and mask[1, 2].tolist() == [1] + [0] * (ids.shape[2] - 1)
    n_labels = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    assert int((labels[:, :, 1:] != IGNORE_INDEX).sum()) == n_labels
    with pytest.raises(ValueError, match="more than 2 rows"):
        loop.pad_micro_batches(micro, rows=2, multiple=64)


def test_graph_step_loss_equals_the_eager_accumulation(tiny_dir: Path, byte_tok) -> None:
    ex = _examples(byte_tok)
    micro = [collate(ex[0:4]), collate(ex[4:7])]
    model = _model(tiny_dir, "cpu", 0.0)
    model.train()
    params = loop.adapter_parameters(model)
    for p in params:  # lora_B starts at zero: make every adapter matrix get a gradient
        torch.nn.init.normal_(p, std=0.02)
    n_step = sum(b.n_target_tokens for b in micro)
    eager_total = 0.0
    for b in micro:
        loss_sum, _ = loop.causal_lm_loss(model, b)
        (loss_sum / n_step).backward()
        eager_total += float(loss_sum)
    eager_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    loss = loop.accumulated_causal_lm_loss(model, *loop.pad_micro_batches(micro, rows=4, multiple=64))
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(eager_total / n_step, rel=1e-5)
    for got, want in zip((p.grad for p in params), eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_cuda_graph_on_a_cpu_model_is_refused(tiny_dir: Path, byte_tok, tmp_path: Path) -> None:
    model = _model(tiny_dir, "cpu", 0.0)
    config = loop.TrainConfig(output_dir=str(tmp_path), max_steps=1, cuda_graph=True, progress=False, plot=False)
    with pytest.raises(ValueError, match="CUDA device"):
        loop.train(model, _examples(byte_tok), config)
    with pytest.raises(ValueError, match="graph_pad_multiple"):
        loop.TrainConfig(graph_pad_multiple=0)


def _run(tiny_dir: Path, byte_tok, out: Path, graph: bool, dropout: float, **kw) -> list[float]:
    model = _model(tiny_dir, "cuda", dropout)
    resume = kw.pop("resume", False)
    config = loop.TrainConfig(
        output_dir=str(out),
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        bf16="no",
        fast=False,  # the graph alone (no compiled blocks, no packing): compared with the eager loop
        cuda_graph=graph,
        gradient_checkpointing=True,
        progress=False,
        plot=False,
        **kw,
    )
    return loop.train(model, _examples(byte_tok), config, resume=resume).losses


@pytest.mark.gpu
def test_graphed_training_follows_the_eager_curve(tiny_dir: Path, byte_tok, tmp_path: Path) -> None:
    eager = _run(tiny_dir, byte_tok, tmp_path / "eager", False, 0.0)
    graphed = _run(tiny_dir, byte_tok, tmp_path / "graph", True, 0.0)
    assert len(graphed) == 6
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-4, atol=1e-5)


@pytest.mark.gpu
def test_graphed_training_resumes_exactly(tiny_dir: Path, byte_tok, tmp_path: Path) -> None:
    """With dropout and checkpointing: a resumed run replays the same masks (their streams are saved)."""
    straight = _run(tiny_dir, byte_tok, tmp_path / "a", True, 0.1)
    saved = _run(tiny_dir, byte_tok, tmp_path / "b", True, 0.1, save_every=3, keep_last=5)
    assert saved == straight  # saving checkpoints changes nothing
    ckpt = tmp_path / "b" / "checkpoints" / "checkpoint-000003"
    resumed = _run(tiny_dir, byte_tok, tmp_path / "b", True, 0.1, resume=str(ckpt))
    assert resumed == straight


@pytest.mark.gpu
def test_an_eager_checkpoint_resumes_in_graph_mode_and_back(tiny_dir: Path, byte_tok, tmp_path: Path) -> None:
    """Switching modes at a resume: optimizer flags, lr and step counts are converted; the curve goes on."""
    eager = _run(tiny_dir, byte_tok, tmp_path / "a", False, 0.0, save_every=3, keep_last=5)
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-000003"
    graphed = _run(tiny_dir, byte_tok, tmp_path / "a", True, 0.0, resume=str(ckpt))
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-4, atol=1e-5)
    graphed_run = _run(tiny_dir, byte_tok, tmp_path / "b", True, 0.0, save_every=3, keep_last=5)
    back = _run(tiny_dir, byte_tok, tmp_path / "b", False, 0.0, resume=str(tmp_path / "b" / "checkpoints" / ckpt.name))
    torch.testing.assert_close(torch.tensor(back), torch.tensor(graphed_run), rtol=2e-4, atol=1e-5)
