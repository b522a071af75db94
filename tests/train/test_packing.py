"""Packed rows (minilora.train.fast): examples share a row but never see each other.

On the CPU: first-fit-decreasing packing keeps every example whole and once; a packed example's logits
equal the same example run alone (positions restart, attention is block-diagonal); the loss of packed
rows equals the loss of the same examples padded, and 50 optimizer steps on packed rows follow the
padded run's loss curve; the path chooser keeps the eager loop off CUDA and says why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from minilora.loading import from_pretrained
from minilora.lora import add_lora
from minilora.train import lm_loss, loop
from minilora.train.data import IGNORE_INDEX, Example, collate, collate_packed, tokenize_records
from minilora.train.fast import choose_path, document_ids, pack_first_fit
from minilora_demo.price import split_products


def _examples(byte_tok, n: int = 12) -> list[Example]:
    train_p, _, _ = split_products(n, 4, 0, seed=3)
    return tokenize_records([p.record() for p in train_p], byte_tok, max_length=160).examples


def _model(tiny_dir: Path, dropout: float = 0.0):
    model = from_pretrained(tiny_dir, quantize="nf4")
    loop.seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_first_fit_keeps_each_example_whole_and_once() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 4]
    ex = [Example(list(range(100 * i, 100 * i + n)), list(range(100 * i, 100 * i + n))) for i, n in enumerate(lengths)]
    rows = pack_first_fit(ex, pack_length=10)
    assert all(len(r.input_ids) <= 10 for r in rows)
    assert len(rows) == 4  # 38 tokens in rows of 10: first-fit decreasing needs the minimum, 4
    found = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            seg = r.input_ids[a:b]
            found.append(seg[0] // 100)
            assert seg == ex[seg[0] // 100].input_ids  # whole, in order
            assert r.labels[a] == IGNORE_INDEX and r.labels[a + 1 : b] == ex[seg[0] // 100].labels[1:]
    assert sorted(found) == list(range(len(ex)))
    assert pack_first_fit(ex, 10) == rows  # deterministic
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than pack_length=8"):
        pack_first_fit(ex, 8)


def test_document_ids_restart_at_each_position_zero() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]


def test_a_packed_example_sees_only_itself(tiny_dir: Path, byte_tok) -> None:
    model = _model(tiny_dir).eval()
    ex = _examples(byte_tok)[:3]
    row = pack_first_fit(ex, sum(len(e.input_ids) for e in ex))
    assert len(row) == 1
    batch = collate_packed(row)
    with torch.no_grad():
        packed = model(batch.input_ids, position_ids=batch.position_ids, document_ids=document_ids(batch.position_ids))
        starts = [i for i, p in enumerate(row[0].position_ids) if p == 0]
        bounds = starts + [len(row[0].input_ids)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            alone = model(batch.input_ids[:, a:b])
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-5)
        # without the document mask the later examples would see the earlier ones: the test can fail
        leaky = model(batch.input_ids, position_ids=batch.position_ids)
        a, b = bounds[1], bounds[2]
        assert (leaky[:, a:b] - model(batch.input_ids[:, a:b])).abs().max() > 1e-3


def test_packed_rows_give_the_padded_loss_and_curve(tiny_dir: Path, byte_tok) -> None:
    ex = _examples(byte_tok, n=8)
    curves = {}
    for mode in ("padded", "packed"):
        model = _model(tiny_dir).train()
        params = loop.adapter_parameters(model)
        opt = torch.optim.AdamW(params, lr=2e-3)
        batches = [collate(ex[0:4]), collate(ex[4:8])]
        if mode == "packed":
            batches = [collate_packed(pack_first_fit(ex[i : i + 4], 4 * 160)) for i in (0, 4)]
        curve = []
        for step in range(50):
            b = batches[step % 2]
            loss_sum, n = loop.causal_lm_loss(model, b)
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(float(loss_sum.detach()) / n)
        curves[mode] = curve
    assert curves["packed"][0] == pytest.approx(curves["padded"][0], rel=1e-5)
    torch.testing.assert_close(torch.tensor(curves["packed"]), torch.tensor(curves["padded"]), rtol=1e-3, atol=1e-4)
    assert curves["padded"][-1] < 0.95 * curves["padded"][0]  # it trained


def test_off_cuda_the_eager_loop_runs_and_says_why(tiny_dir: Path, byte_tok, tmp_path: Path, caplog) -> None:
    model = _model(tiny_dir)
    ex = _examples(byte_tok)
    path = choose_path(model, ex, loop.TrainConfig())
    assert (path.compile_blocks, path.cuda_graph, path.pack_length) == (False, False, None)
    assert "needs CUDA, the model is on cpu" in path.describe()
    assert "fast=False" in choose_path(model, ex, loop.TrainConfig(fast=False)).describe()
    forced = choose_path(model, ex, loop.TrainConfig(packing=True))
    assert forced.pack_length == 192 and "packed rows of 192 tokens" in forced.describe()
    config = loop.TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, progress=False, plot=False)
    with caplog.at_level(logging.INFO, logger="minilora.train.loop"):
        result = loop.train(model, ex, config)
    assert result.path == "eager (reference)" and result.warmup_s is None
    assert any(r.getMessage().startswith("training path: eager (reference)") for r in caplog.records)


def test_long_sequences_take_the_chunked_head_with_the_same_loss(tiny_dir: Path, byte_tok, monkeypatch) -> None:
    model = _model(tiny_dir).train()
    batch = collate(_examples(byte_tok)[:4])
    params = loop.adapter_parameters(model)
    results = []
    for threshold in (loop.CHUNKED_LOGITS, 0):  # 0: every batch counts as long
        monkeypatch.setattr(lm_loss, "CHUNKED_LOGITS", threshold)  # read where causal_lm_loss lives
        loss_sum, n = loop.causal_lm_loss(model, batch)
        (loss_sum / n).backward()
        results.append((float(loss_sum.detach()), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (plain, g_plain), (chunked, g_chunked) = results
    assert chunked == pytest.approx(plain, rel=1e-5)
    for a, b in zip(g_chunked, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_offloaded_checkpoints_give_the_checkpointed_gradients(tiny_dir: Path, byte_tok) -> None:
    from minilora.train.offload import offloaded_checkpoint

    batch = collate(_examples(byte_tok)[:4])
    results = []
    for fn in (None, offloaded_checkpoint):
        model = _model(tiny_dir, dropout=0.2)  # randomness inside the layers: the recompute must replay it
        model.train()
        model.gradient_checkpointing = True
        model.model.checkpoint_fn = fn
        torch.manual_seed(5)
        loss_sum, n = loop.causal_lm_loss(model, batch)
        (loss_sum / n).backward()
        results.append((float(loss_sum.detach()), [p.grad.clone() for p in loop.adapter_parameters(model)]))
    (plain, g_plain), (off, g_off) = results
    assert off == pytest.approx(plain, rel=1e-6)
    torch.manual_seed(6)  # another draw of the dropout masks gives another loss: the masks matter
    assert float(loop.causal_lm_loss(model, batch)[0].detach()) != pytest.approx(plain, rel=1e-6)
    for a, b in zip(g_off, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
