"""Data pipeline: JSONL errors name file and line, loss masking labels, truncation, padding, packing."""

from __future__ import annotations

import json

import pytest
import torch

from minilora.train.data import (
    IGNORE_INDEX,
    DataOrder,
    Record,
    collate,
    pack_examples,
    records_from_list,
    tokenize_record,
    tokenize_records,
)
from minilora.train.datasets import load_jsonl


def test_jsonl_reads_records_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert load_jsonl(good) == [Record("a", "b"), Record("c", "d")]

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_jsonl(bad_json)

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing field\(s\) \['completion'\]"):
        load_jsonl(missing)

    with pytest.raises(ValueError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="record 1: field 'prompt' must be a string"):
        records_from_list([{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}])


def test_labels_mask_the_prompt_and_eos_is_learned(byte_tok):
    ex = tokenize_record(Record("Price is $", "12.00"), byte_tok)
    prompt_ids = byte_tok.encode("Price is $")
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.input_ids[0] == byte_tok.bos_token_id
    assert ex.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ex.labels[len(prompt_ids) :] == byte_tok.encode("12.00", add_bos=False) + [byte_tok.eos_token_id]
    assert ex.input_ids[-1] == byte_tok.eos_token_id


def test_truncation_cuts_the_prompt_from_the_left_keeping_bos_and_completion(byte_tok):
    rec = Record("abcdefghij", "XYZ")
    ex = tokenize_record(rec, byte_tok, max_length=8)  # BOS + 3 prompt bytes + XYZ + EOS
    assert len(ex.input_ids) == 8
    assert ex.input_ids[0] == byte_tok.bos_token_id
    assert byte_tok.decode(ex.input_ids[1:4]) == "hij"
    assert byte_tok.decode(ex.input_ids[4:7]) == "XYZ"
    assert ex.n_target_tokens == 4

    # a completion that cannot fit is an error by default, a counted skip on request; never silent
    with pytest.raises(ValueError, match=r"train 1: the completion alone is 8 tokens"):
        tokenize_records([rec, Record("p", "LONGONE")], byte_tok, max_length=6, source="train")
    data = tokenize_records([rec, Record("p", "LONGONE")], byte_tok, max_length=6, overflow="skip")
    assert data.skipped == 1 and data.skipped_indices == [1] and len(data) == 1 and data.truncated == 1


def test_dynamic_padding_and_packing(byte_tok):
    exs = tokenize_records([Record("ab", "c"), Record("abcdef", "gh")], byte_tok).examples
    batch = collate(exs, pad_token_id=258)
    assert batch.input_ids.shape == (2, max(len(e.input_ids) for e in exs))
    n0 = len(exs[0].input_ids)
    assert batch.attention_mask[0].tolist() == [1] * n0 + [0] * (batch.input_ids.shape[1] - n0)
    assert (batch.labels[0, n0:] == IGNORE_INDEX).all() and (batch.input_ids[0, n0:] == 258).all()

    rows = pack_examples(exs, max_length=64)
    assert len(rows) == 1
    row = rows[0]
    assert row.input_ids == exs[0].input_ids + exs[1].input_ids
    assert row.position_ids == list(range(n0)) + list(range(len(exs[1].input_ids)))
    assert row.labels[n0] == IGNORE_INDEX  # nothing learns to predict the next example's first token
    assert sum(x != IGNORE_INDEX for x in row.labels) == sum(e.n_target_tokens for e in exs)
    assert len(pack_examples(exs, max_length=len(exs[1].input_ids))) == 2


def test_data_order_is_deterministic_and_resumable(byte_tok):
    exs = tokenize_records([Record(f"p{i}", f"c{i}") for i in range(10)], byte_tok).examples
    a = DataOrder(exs, batch_size=3, seed=7)
    first = [a.next_batch().input_ids for _ in range(9)]  # crosses epoch boundaries
    b = DataOrder(exs, batch_size=3, seed=7)
    for _ in range(5):
        b.next_batch()
    c = DataOrder(exs, batch_size=3, seed=7)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    rest = [c.next_batch().input_ids for _ in range(4)]
    for x, y in zip(first[5:], rest, strict=True):
        assert torch.equal(x, y)
    assert a.epoch == 2
