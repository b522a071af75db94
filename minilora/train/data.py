"""Prompt/completion data for supervised fine-tuning: records, tokenization with loss masking, batching.

A record is a prompt and the completion the model should learn to write after it:

    {"prompt": "How much does this cost ...\\n\\nPrice is $", "completion": "42.00"}

Tokenized, the model sees prompt + completion + EOS and learns only the completion (InstructGPT-style
"loss on the answer only"): every prompt position carries the label -100, which the causal-LM loss
ignores, so prompt tokens add nothing to the loss or to the gradients.

    input_ids  [BOS  How  much ... $ | 4   2   .   0   0   EOS]
    labels     [-100 -100 -100 ... -100 | 4   2   .   0   0   EOS]      (shifted by one in the loss)

Too long a record is cut from the LEFT of the prompt (the BOS token, if any, is kept), because the end
of the prompt and the completion are what the answer depends on. A completion that cannot fit even with
an empty prompt is never dropped silently: ``overflow="error"`` (default) raises a ValueError naming the
record, ``overflow="skip"`` leaves it out, counts it in ``TokenizedDataset.skipped`` and logs a warning.

Batches are padded dynamically to the longest sequence of the batch (right padding, label -100,
attention mask 0). With ``pack=True`` several examples share one row of ``max_length`` tokens; each one
restarts its position ids at 0 and its first label is -100. The decoder's attention mask is a padding
mask, not a block-diagonal one, so a packed example can still attend to the examples before it in the
same row (as in transformers' packing without flash-attention's varlen kernels); use packing for
throughput on long data, not when examples must be isolated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from minilora.errors import DatasetError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label the causal-LM loss skips (torch's cross_entropy ignore_index)


class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (minilora.io.tokenizer.Tokenizer fits)."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    @property
    def eos_token_id(self) -> int | None: ...


@dataclass(frozen=True)
class Record:
    """One training example: the prompt (no loss) and the completion (learned)."""

    prompt: str
    completion: str


@dataclass
class Example:
    """A tokenized record: input ids and labels of the same length (-100 on the prompt)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "input_ids and labels differ in length"

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- records
def record_from(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected an object with 'prompt' and 'completion', got {type(obj).__name__}")
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing} (found {sorted(obj)})")
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise DatasetError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["completion"]:
        raise DatasetError(f"{where}: field 'completion' is empty; there would be nothing to learn")
    return Record(obj["prompt"], obj["completion"])


def records_from_list(items: Iterable[dict[str, Any] | Record]) -> list[Record]:
    """Records from Python dicts ({"prompt", "completion"}) or Records; errors name the item index."""
    out = []
    for i, item in enumerate(items):
        out.append(item if isinstance(item, Record) else record_from(item, f"record {i}"))
    return out


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records as JSON Lines (atomically)."""
    from minilora.io.safe_write import atomic_write_bytes

    text = "".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- tokenizing
def tokenize_record(
    record: Record,
    tokenizer: TextTokenizer,
    max_length: int | None = None,
    eos_token_id: int | None = None,
    where: str = "record",
) -> Example:
    """prompt + completion + EOS as ids, with labels -100 on the prompt; truncate the prompt from the left.

    The prompt is encoded with the tokenizer's BOS convention, the completion without BOS. Raises
    ValueError when the completion (+ EOS, + BOS if any) alone exceeds ``max_length``.
    """
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    prompt_ids = list(tokenizer.encode(record.prompt))
    completion_ids = list(tokenizer.encode(record.completion, add_bos=False))
    if eos is not None:
        completion_ids.append(eos)
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_head = 1 if prompt_ids and bos is not None and prompt_ids[0] == bos else 0
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        room = max_length - len(completion_ids) - keep_head  # prompt tokens that still fit after the head
        if room < 0:
            raise ValueError(
                f"{where}: the completion alone is {len(completion_ids)} tokens (with EOS), more than "
                f"max_length={max_length}{' minus BOS' if keep_head else ''}; raise max_length or shorten it"
            )
        body = prompt_ids[keep_head:]
        prompt_ids = prompt_ids[:keep_head] + (body[len(body) - room :] if room else [])
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Example(input_ids, labels)


@dataclass
class TokenizedDataset:
    """Tokenized examples plus what tokenizing cost (records skipped, prompts truncated)."""

    examples: list[Example]
    skipped: int = 0
    truncated: int = 0
    skipped_indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def tokenize_records(
    records: Sequence[Record],
    tokenizer: TextTokenizer,
    max_length: int | None = None,
    overflow: str = "error",
    eos_token_id: int | None = None,
    source: str = "record",
) -> TokenizedDataset:
    """Tokenize every record (see :func:`tokenize_record`).

    overflow: what to do with a record whose completion cannot fit in ``max_length``: "error" raises,
        "skip" leaves it out, counts it and logs a warning (never silent).
    """
    if overflow not in ("error", "skip"):
        raise ValueError(f"overflow must be 'error' or 'skip', got {overflow!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    data = TokenizedDataset([])
    for i, record in enumerate(records):
        try:
            example = tokenize_record(record, tokenizer, max_length, eos_token_id, where=f"{source} {i}")
        except ValueError:
            if overflow == "error":
                raise
            data.skipped += 1
            data.skipped_indices.append(i)
            continue
        n_full = len(tokenizer.encode(record.prompt))
        if example.labels.count(IGNORE_INDEX) < n_full:
            data.truncated += 1
        data.examples.append(example)
    if data.skipped:
        logger.warning(
            "%d of %d records skipped: completion longer than max_length=%s (first: %s %d)",
            data.skipped,
            len(records),
            max_length,
            source,
            data.skipped_indices[0],
        )
    if not data.examples:
        raise ValueError(f"no examples left after tokenizing {len(records)} records (max_length={max_length})")
    return data


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class Batch:
    """Padded tensors for one forward pass (B, T)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None  # set for packed rows (positions restart per example)

    @property
    def n_target_tokens(self) -> int:
        """Tokens the loss counts: labels != -100 after the shift by one."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), pos)


def collate(examples: Sequence[Example], pad_token_id: int = 0) -> Batch:
    """Right-pad to the longest example of the batch: pad ids, labels -100, attention mask 0."""
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(input_ids, labels, mask)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedily concatenate examples (in order) into rows of at most ``max_length`` tokens.

    Each packed row is returned as an Example whose ``position_ids`` restart at every example; use
    :func:`collate_packed` to batch them. An example's first label is set to -100 so no example learns
    to predict the start of the next one.
    """
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        if len(e.input_ids) > max_length:
            raise ValueError(f"an example of {len(e.input_ids)} tokens is longer than max_length={max_length}")
        if len(ids) + len(e.input_ids) > max_length:
            rows.append(PackedExample(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + e.input_ids
        labels = labels + [IGNORE_INDEX] + e.labels[1:]
        positions = positions + list(range(len(e.input_ids)))
    if ids:
        rows.append(PackedExample(ids, labels, positions))
    return rows


@dataclass
class PackedExample(Example):
    """Several examples in one row; ``position_ids`` restart at 0 at each example."""

    position_ids: list[int] = field(default_factory=list)


def collate_packed(rows: Sequence[PackedExample], pad_token_id: int = 0) -> Batch:
    """Right-pad packed rows; position ids run on through the padding (masked out anyway)."""
    batch = collate(rows, pad_token_id)
    B, T = batch.input_ids.shape
    pos = torch.arange(T).repeat(B, 1)  # (B, T)
    for i, row in enumerate(rows):
        pos[i, : len(row.position_ids)] = torch.tensor(row.position_ids)
    batch.position_ids = pos
    return batch


# ---------------------------------------------------------------------------------------------- order
class DataOrder:
    """A deterministic, resumable order of batches: epoch e shuffles with seed (seed, e).

    ``position`` = (epoch, batch index within the epoch) is all a checkpoint needs to continue the same
    sequence of batches after a restart.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_token_id: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad_token_id = pad_token_id
        self.packed = bool(self.examples) and isinstance(self.examples[0], PackedExample)
        n = len(self.examples)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} examples make no full batch of {batch_size} with drop_last=True")
        self.epoch = 0
        self.index = 0  # next batch within the epoch

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def next_batch(self) -> Batch:
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        perm = self._permutation(self.epoch)
        chosen = [self.examples[j] for j in perm[self.index * self.batch_size : (self.index + 1) * self.batch_size]]
        self.index += 1
        if self.packed:
            return collate_packed(chosen, self.pad_token_id)  # type: ignore[arg-type]
        return collate(chosen, self.pad_token_id)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


def eval_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int = 0) -> list[Batch]:
    """The examples in order, in padded batches (for evaluation)."""
    if examples and isinstance(examples[0], PackedExample):
        make = collate_packed
    else:
        make = collate
    return [make(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]  # type: ignore[arg-type]
