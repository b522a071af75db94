"""Dataset errors: every bad record is a DatasetError naming file and line (bytes that are not UTF-8 too),
and nothing is dropped silently (a record that cannot fit is an error, or skipped and counted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minilora.errors import DatasetError
from minilora.train.datasets import build_examples, load_jsonl, read_rows


def _rows_of(path: Path, text: str | bytes) -> None:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.jsonl", '{"text": "ok"}\n\n{"text": "ok"\n', r"a\.jsonl:3: invalid JSON"),
        ("b.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"b\.jsonl:2: byte 0xe9 at column 14 is not UTF-8"),
        ("c.json", '[\n  {"text": "ok"},\n  {"text": ok}\n]', r"c\.json:3: invalid JSON"),
        ("d.json", '{"text": "not an array"}', r"d\.json:1: a \.json data file must hold one array"),
        ("e.csv", 'prompt,completion\na,b\n"x\ny",z,extra\n', r"e\.csv:3: more cells than the 2 header columns"),
        ("f.csv", b"prompt,completion\na,b\nc,\xff\n", r"f\.csv:3: byte 0xff .* not UTF-8"),
        ("g.txt", "hello", r"g\.txt: unknown data file type '\.txt'"),
        ("h.jsonl", "\n\n", r"h\.jsonl: no records"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, content: str | bytes, match: str) -> None:
    path = tmp_path / name
    _rows_of(path, content)
    with pytest.raises(DatasetError, match=match):
        read_rows(path)


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"text": "ok"}, {"txt": "typo"}], r"x\.jsonl:2: no 'messages', 'prompt'/'completion' or 'text' field"),
        ([{"text": "ok"}, {"prompt": "p", "completion": "c"}], r"x\.jsonl:2: a prompt_completion record in a file"),
        ([{"prompt": "p", "completion": ""}], r"x\.jsonl:1: field 'completion' is empty"),
        ([{"prompt": "p"}], r"x\.jsonl:1: missing field\(s\) \['completion'\]"),
        ([{"text": 3}], r"x\.jsonl:1: field 'text' must be a string, got int"),
        ([{"messages": "hi"}], r"x\.jsonl:1: field 'messages' is not a JSON list"),
        ([{"messages": [{"role": "user"}]}], r"x\.jsonl:1: messages\[0\] \(role 'user'\) needs a string 'content'"),
        ([{"messages": [{"content": "x"}]}], r"x\.jsonl:1: messages\[0\] must be an object with a string 'role'"),
        ([["a list"]], r"x\.jsonl:1: expected an object"),
    ],
)
def test_bad_records_name_file_and_line(byte_tok, tmp_path: Path, records: list, match: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DatasetError, match=match):
        build_examples(read_rows(path), byte_tok)


def test_a_chat_without_assistant_turn_and_a_completion_too_long(byte_tok, tmp_path: Path) -> None:
    byte_tok.config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    try:
        path = tmp_path / "chat.jsonl"
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
        with pytest.raises(DatasetError, match=r"chat\.jsonl:1: no assistant turn to learn from"):
            build_examples(read_rows(path), byte_tok)
        examples, summary = build_examples(read_rows(path), byte_tok, loss_on="all")
        assert summary.examples == 1 and examples[0].labels == examples[0].input_ids
    finally:
        del byte_tok.config["chat_template"]

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c" * 100}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"long\.jsonl:1: the completion alone is 101 tokens.*--skip-long"):
        build_examples(read_rows(path)[:1], byte_tok, max_length=50)


def test_load_jsonl_keeps_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: missing field\(s\) \['completion'\]"):
        load_jsonl(path)
    path.write_bytes(b'{"prompt": "a", "completion": "\xc3"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: byte 0xc3"):
        load_jsonl(path)
