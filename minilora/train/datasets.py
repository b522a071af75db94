"""Training data in the formats people have: JSONL, JSON or CSV of prompt/completion, text, or chat messages.

Three record shapes, told apart by their fields (names mappable with :class:`Columns`):

    {"prompt": "...", "completion": "..."}     loss on the completion (+ EOS), prompt cut from the left
    {"text": "..."}                            loss on every token (+ EOS), cut from the right
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
                                               rendered with the model's own chat template

A chat record is rendered once with the tokenizer's Jinja template (the same text transformers'
``apply_chat_template`` gives), tokenized whole, and each token is labelled by where its first character
lies: inside an assistant turn it is learned, elsewhere it is -100. An assistant turn is the text the
template adds for that message after the generation prompt, i.e. between

    render(messages[:i], add_generation_prompt=True)   and   render(messages[:i+1])

with trailing whitespace left out, so for ChatML ``<|im_start|>assistant\\n`` is context and
``content<|im_end|>`` is learned (the model learns to stop). Tool turns and ``tool_calls`` are passed to
the template untouched (and a record's ``tools`` list too). ``loss_on``:

    assistant   every assistant turn (prompt/completion: the completion)             (default)
    completion  the last assistant turn only (prompt/completion: the completion)
    all         every token

Every record error is a :class:`minilora.errors.DatasetError` naming ``file:line``; bytes that are not
UTF-8 are named by file, line and byte. What tokenizing cost (records cut to fit ``max_length``,
records skipped and why) is counted in :class:`DataSummary`, printed before training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minilora.errors import DatasetError
from minilora.train.data import IGNORE_INDEX, Example, Record, record_from, tokenize_record

FORMATS = ("prompt_completion", "text", "messages")
LOSS_ON = ("assistant", "completion", "all")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True)
class Columns:
    """Field (column) names of each record shape."""

    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    messages: str = "messages"


@dataclass(frozen=True)
class Row:
    """One record as read, with where it came from (``file:line``)."""

    where: str
    data: dict[str, Any]


@dataclass
class DataSummary:
    """What a data file gave: records, examples, tokens, and what was cut or skipped (and why)."""

    source: str
    format: str
    loss_on: str
    records: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    cut: int = 0  # records shortened to fit max_length
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> records left out
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> file:line of the first one

    def lines(self) -> list[str]:
        """The summary as printed before training."""
        out = [
            f"{self.source}: {self.records} records ({self.format}, loss on {self.loss_on}) -> {self.examples} "
            f"examples, {self.tokens:,} tokens ({self.target_tokens:,} learned)",
        ]
        if self.cut:
            out.append(f"  {self.cut} records cut to fit --max-length")
        for reason, n in sorted(self.skipped.items()):
            out.append(f"  {n} records skipped: {reason} (first: {self.first_skipped[reason]})")
        return out


# ---------------------------------------------------------------------------------------------- reading
def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(
            f"{path}:{line}: byte {raw[e.start]:#04x} at column {col} is not UTF-8 ({e.reason}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _jsonl_rows(path: str, text: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(Row(f"{path}:{lineno}", obj))
    return rows


def _json_rows(path: str, text: str) -> list[Row]:
    """A JSON array of records; each is named by the line its object starts on."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise DatasetError(f"{path}:1: a .json data file must hold one array of records ([{{...}}, ...])")
    i += 1
    rows = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DatasetError(f"{path}:{text.count(chr(10)) + 1}: the array is not closed with ']'")
        if text[i] == "]":
            break
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(Row(f"{path}:{line}", obj))
    return rows


def _csv_rows(path: str, text: str) -> list[Row]:
    """CSV with a header row; a ``messages`` cell holds the JSON list of turns."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DatasetError(f"{path}:1: the CSV file has no header row")
    rows, start = [], 2
    for record in reader:
        if None in record:
            raise DatasetError(f"{path}:{start}: more cells than the {len(reader.fieldnames)} header columns")
        rows.append(Row(f"{path}:{start}", dict(record)))
        start = reader.line_num + 1
    return rows


def read_rows(path: str | os.PathLike, kind: str | None = None) -> list[Row]:
    """The records of a JSONL, JSON (array) or CSV file, each with its ``file:line``.

    kind: "jsonl", "json" or "csv"; None tells it from the file name's extension.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such data file")
    kind = kind or EXTENSIONS.get(Path(path).suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unknown data file type {Path(path).suffix!r}; use .jsonl, .json or .csv")
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    rows = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[kind](path, text)
    if not rows:
        raise DatasetError(f"{path}: no records")
    return rows


def data_sha256(paths: Sequence[str | os.PathLike]) -> str:
    """The SHA-256 of the data files' bytes (in order), recorded with a run to recognise its data."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- shapes
def detect_format(row: Row, columns: Columns = Columns()) -> str:
    """ "messages", "text" or "prompt_completion", from the fields of a record."""
    if not isinstance(row.data, dict):
        raise DatasetError(f"{row.where}: expected an object (a record), got {type(row.data).__name__}")
    keys = set(row.data)
    if columns.messages in keys:
        return "messages"
    if columns.prompt in keys or columns.completion in keys:
        return "prompt_completion"
    if columns.text in keys:
        return "text"
    raise DatasetError(
        f"{row.where}: no {columns.messages!r}, {columns.prompt!r}/{columns.completion!r} or {columns.text!r} "
        f"field (found {sorted(keys)}); map your column names with --messages-field, --prompt-field, "
        "--completion-field or --text-field"
    )


def _string_field(row: Row, key: str, allow_empty: bool = True) -> str:
    if key not in row.data:
        raise DatasetError(f"{row.where}: missing field(s) [{key!r}] (found {sorted(row.data)})")
    value = row.data[key]
    if not isinstance(value, str):
        raise DatasetError(f"{row.where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise DatasetError(f"{row.where}: field {key!r} is empty; there would be nothing to learn")
    return value


def _messages(row: Row, key: str) -> list[dict[str, Any]]:
    value = row.data.get(key)
    if isinstance(value, str):  # a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{row.where}: field {key!r} is not a JSON list of turns ({e.msg})") from None
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{row.where}: field {key!r} must be a non-empty list of turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise DatasetError(f"{row.where}: {key}[{i}] must be an object with a string 'role'")
        content = turn.get("content")
        if not (isinstance(content, str) or (content is None and turn.get("tool_calls"))):
            raise DatasetError(
                f"{row.where}: {key}[{i}] (role {turn['role']!r}) needs a string 'content' "
                f"(got {type(content).__name__})"
            )
    return value


def check_rows(rows: Sequence[Row], columns: Columns = Columns()) -> str:
    """Check every record's shape and fields without a tokenizer (so a bad file fails before any model
    loads); returns the format they share."""
    fmt = detect_format(rows[0], columns)
    for row in rows:
        if detect_format(row, columns) != fmt:
            raise DatasetError(f"{row.where}: a {detect_format(row, columns)} record in a file of {fmt} records")
        if fmt == "messages":
            _messages(row, columns.messages)
        elif fmt == "text":
            _string_field(row, columns.text, allow_empty=False)
        else:
            _string_field(row, columns.prompt)
            _string_field(row, columns.completion, allow_empty=False)
    return fmt


# ---------------------------------------------------------------------------------------------- chat
def assistant_spans(messages: list[dict[str, Any]], tokenizer: Any, **extra: Any) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of each assistant turn), see the module docstring."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **extra)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **extra) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, **extra)
        if not (full.startswith(through) and through.startswith(before)):
            raise DatasetError(
                "the chat template does not render a conversation as the concatenation of its turns, so the "
                "assistant tokens cannot be found; use --loss-on all"
            )
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def tokenize_chat(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    loss_on: str = "assistant",
    max_length: int | None = None,
    tools: list[Any] | None = None,
) -> tuple[Example, bool]:
    """(ids with labels on the assistant tokens, whether the conversation was cut to ``max_length``)."""
    extra = {"tools": tools} if tools else {}
    text, spans = assistant_spans(messages, tokenizer, **extra)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if loss_on == "completion":
        spans = spans[-1:]
    if loss_on == "all":
        labels = list(ids)
    else:
        inside = [any(s <= start < e for s, e in spans) for start, _ in offsets]
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, inside, strict=True)]
    cut = max_length is not None and len(ids) > max_length
    if cut:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels), cut


# ---------------------------------------------------------------------------------------------- examples
def _example(row: Row, fmt: str, tokenizer: Any, loss_on: str, max_length: int | None, columns: Columns):
    """(example, cut) for one row; raises DatasetError for a bad record, ValueError for one that cannot fit."""
    if fmt == "messages":
        tools = row.data.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools) if tools.strip() else None
        return tokenize_chat(_messages(row, columns.messages), tokenizer, loss_on, max_length, tools)
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = tokenizer.encode(_string_field(row, columns.text, allow_empty=False))
        ids = ids + ([eos] if eos is not None else [])
        cut = max_length is not None and len(ids) > max_length
        ids = ids[:max_length] if cut else ids
        return Example(ids, list(ids)), cut
    record = Record(_string_field(row, columns.prompt), _string_field(row, columns.completion, allow_empty=False))
    example = tokenize_record(record, tokenizer, max_length, where=row.where)
    n_prompt = len(tokenizer.encode(record.prompt))
    cut = example.labels.count(IGNORE_INDEX) < n_prompt
    if loss_on == "all":
        example = Example(example.input_ids, list(example.input_ids))
    return example, cut


def build_examples(
    rows: Sequence[Row],
    tokenizer: Any,
    loss_on: str = "assistant",
    max_length: int | None = None,
    columns: Columns = Columns(),
    skip_long: bool = False,
    source: str = "data",
) -> tuple[list[Example], DataSummary]:
    """Tokenize every row (all rows must share one shape); returns the examples and their summary.

    A record that cannot fit ``max_length`` at all (a completion longer than it; a conversation whose
    assistant tokens all fall past it) raises, or with ``skip_long`` is left out and counted.
    """
    if loss_on not in LOSS_ON:
        raise DatasetError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    fmt = check_rows(rows, columns)
    summary = DataSummary(source, fmt, "all" if fmt == "text" else loss_on, records=len(rows))
    examples = []
    for row in rows:
        reason = None
        try:
            example, cut = _example(row, fmt, tokenizer, loss_on, max_length, columns)
        except DatasetError:
            raise
        except ValueError as e:  # tokenize_record: the completion alone exceeds max_length
            if not skip_long:
                raise DatasetError(f"{e} (or pass --skip-long)") from None
            reason, example, cut = "completion longer than --max-length", None, False
        if example is not None and example.n_target_tokens == 0:
            if fmt == "messages" and not any(t.get("role") == "assistant" for t in row.data[columns.messages]):
                raise DatasetError(f"{row.where}: no assistant turn to learn from (or use --loss-on all)")
            if not skip_long:
                raise DatasetError(
                    f"{row.where}: no learned token left within --max-length {max_length}; raise it or pass --skip-long"
                )
            reason = "no learned token within --max-length"
        if reason is not None:
            summary.skipped[reason] += 1
            summary.first_skipped.setdefault(reason, row.where)
            continue
        summary.cut += int(cut)
        summary.tokens += len(example.input_ids)
        summary.target_tokens += example.n_target_tokens
        examples.append(example)
    summary.examples = len(examples)
    if not examples:
        raise DatasetError(f"{source}: no examples left after tokenizing {len(rows)} records")
    return examples, summary


def split_eval(rows: Sequence[Row], fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, eval): a seeded random ``fraction`` of the rows held out (at least one when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"--eval-split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(rows), []
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DatasetError(f"--eval-split {fraction} of {len(rows)} records leaves nothing to train on")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_jsonl(path: str | os.PathLike) -> list[Record]:
    """Prompt/completion records from a JSON Lines file, one object per line (blank lines are skipped).

    Errors (DatasetError) name the file and the 1-based line: bad JSON or UTF-8, a non-object, a missing
    or non-string field. For the other formats (text, messages; JSON and CSV) see below.
    """
    return [record_from(row.data, row.where) for row in read_rows(path, kind="jsonl")]
