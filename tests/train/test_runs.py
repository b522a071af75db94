"""Runs that cannot be mixed up (minilora.train.run through train()): a resume of a changed run is refused
with the difference named, --allow-changes continues with the schedule recomputed and the change logged,
--resume with no checkpoint is an error, a directory of another run is refused unless overwrite, and the
final step is always checkpointed. (Kill-and-resume bit-identity: test_resume.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from minilora.train.checkpoint import latest_checkpoint
from minilora.train.data import Record, tokenize_records
from minilora.train.loop import TrainConfig, seed_everything, train, warmup_cosine
from minilora.train.run import RunError


@pytest.fixture(scope="module")
def examples(byte_tok):
    records = [Record(f"Item {i}, price $", f"{10 + i}.00") for i in range(8)]
    return tokenize_records(records, byte_tok).examples


def _run(tiny_dir, examples, out: Path, **kw):
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    model = from_pretrained(tiny_dir)
    seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    fields = {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "save_every": 2, "plot": False}
    fields.update(kw.pop("config", {}))
    config = TrainConfig(str(out), progress=False, **fields)
    run_info = kw.pop("run_info", {"data": {"sha256": "aaa"}})
    return train(model, examples, config, pad_token_id=258, run_info=run_info, **kw)


def test_changed_runs_are_refused_and_allow_changes_logs_and_reschedules(tiny_dir, examples, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(tiny_dir, examples, out)
    assert first.steps == 4 and latest_checkpoint(out).step == 4  # the final step is checkpointed
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    with pytest.raises(RunError, match=r"train\.lr: 0\.01 -> 0\.005"):
        _run(tiny_dir, examples, out, resume=True, config={"lr": 5e-3, "max_steps": 6})
    with pytest.raises(RunError, match=r"data\.sha256: 'aaa' -> 'bbb'"):
        _run(tiny_dir, examples, out, resume=True, config={"max_steps": 6}, run_info={"data": {"sha256": "bbb"}})

    more = _run(tiny_dir, examples, out, resume=True, allow_changes=True, config={"lr": 5e-3, "max_steps": 6})
    assert more.resumed_from == 4 and more.steps == 6
    assert any("train.max_steps: 4 -> 6" in c for c in more.changes)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [m for m in metrics if m.get("event") == "resumed with changes"]
    assert len(events) == 1 and events[0]["step"] == 4
    lrs = {m["step"]: m["lr"] for m in metrics if "lr" in m}
    assert list(lrs) == [1, 2, 3, 4, 5, 6]  # one run's curve, each step once
    for step in (5, 6):  # the new schedule: lr 5e-3, cosine over 6 steps, at the 0-based step s = step - 1
        assert math.isclose(lrs[step], 5e-3 * warmup_cosine(step - 1, 1, 6), rel_tol=1e-6)
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == run_id and record["changes"][0]["step"] == 4
    assert record["identity"]["train"]["lr"] == 5e-3

    # the changed run is now the run of this directory: resuming it unchanged is accepted
    again = _run(tiny_dir, examples, out, resume=True, config={"lr": 5e-3, "max_steps": 6})
    assert again.resumed_from == 6 and not again.changes


def test_resume_without_checkpoint_and_a_directory_of_another_run(tiny_dir, examples, tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"--resume: no complete checkpoint under"):
        _run(tiny_dir, examples, tmp_path / "empty", resume=True)
    out = tmp_path / "run"
    _run(tiny_dir, examples, out, config={"max_steps": 2})
    with pytest.raises(RunError, match=r"already holds run [0-9a-f]{12} .*--resume .*--overwrite"):
        _run(tiny_dir, examples, out, config={"max_steps": 3})
    (out / "notes.txt").write_text("mine")
    result = _run(tiny_dir, examples, out, overwrite=True, config={"max_steps": 3})
    assert result.steps == 3 and result.resumed_from is None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the old run's metrics are gone
    assert (out / "notes.txt").read_text() == "mine"  # not a file of a run: kept
