"""Runs that cannot be mixed up: each run directory records who it is, and only that run continues in it.

A run's identity is everything that decides its result: the training hyper-parameters (TrainConfig
minus bookkeeping such as the output directory, logging and checkpoint cadence) plus what the caller
adds (``run_info``: model, quantization, LoRA settings, data files and the SHA-256 of their bytes,
max length, loss mask). It is written to ``<out>/run.json`` when the run starts and into every
checkpoint's trainer_state.json, so a checkpoint knows the run it belongs to.

    fresh start, <out> empty or absent     start (run.json written)
    fresh start, <out> holds a run         refused, unless overwrite=True (that run's files are removed)
    resume, no checkpoint in <out>         refused (nothing to continue)
    resume, identity unchanged             continue; bit-identical to a run never stopped
    resume, identity changed               refused with every difference listed, unless allow_changes:
                                           then the new values apply, the learning-rate schedule is
                                           recomputed for them, and the change is logged (metrics.jsonl
                                           and run.json's "changes")
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minilora.errors import MiniloraError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# files a run writes into its directory (removed by overwrite=True; anything else is left alone)
RUN_ENTRIES = ("run.json", "metrics.jsonl", "checkpoints", "adapter", "loss_curve.png")
# TrainConfig fields that change how a run is watched or stored, not what it computes
BOOKKEEPING = frozenset(
    {
        "output_dir",
        "progress",
        "plot",
        "log_every",
        "save_every",
        "keep_last",
        "eval_every",
        "eval_batch_size",
        "save_final_adapter",
        "cuda_graph",
        "graph_pad_multiple",
        "cache_base_weights",
    }
)


class RunError(MiniloraError):
    """An output directory that holds another run, or a resume that does not match its run."""


def run_identity(config: Any, run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able identity of a run: TrainConfig's result-deciding fields plus ``run_info``."""
    fields = {k: v for k, v in asdict(config).items() if k not in BOOKKEEPING}
    identity = json.loads(json.dumps({"train": fields, **(run_info or {})}, default=str))
    return identity


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every field that differs (nested keys dotted), sorted."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def read_run_file(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: unreadable run record ({e.msg} at line {e.lineno})") from None


def write_run_file(out: str | Path, record: dict[str, Any]) -> None:
    from minilora.io.safe_write import atomic_write_bytes

    atomic_write_bytes(Path(out) / RUN_FILE, (json.dumps(record, indent=2) + "\n").encode("utf-8"))


def start_fresh(out: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Refuse an ``out`` that holds files unless ``overwrite``; then record the new run. Returns run.json."""
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-"))
        if present and not overwrite:
            previous = read_run_file(out)
            who = f"run {previous.get('run_id')}" if previous else "files"
            raise RunError(
                f"{out} already holds {who} ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); "
                "pass --resume to continue that run, --overwrite to replace it, or choose another --out"
            )
        for name in RUN_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        kept = [p.name for p in out.iterdir()]
        if kept:
            logger.warning("--overwrite: %s kept in %s (not files of a run)", kept, out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": uuid.uuid4().hex[:12],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "changes": [],
    }
    write_run_file(out, record)
    return record


def check_resume(
    out: Path, saved: dict[str, Any] | None, identity: dict[str, Any], allow_changes: bool, step: int
) -> tuple[dict[str, Any], list[str]]:
    """Compare the checkpoint's identity with this run's; returns (run.json record, differences).

    Raises RunError listing the differences unless ``allow_changes``; with it the change is recorded.
    """
    record = read_run_file(out) or {"run_id": uuid.uuid4().hex[:12], "identity": identity, "changes": []}
    saved = saved if saved is not None else record.get("identity")
    if saved is None:
        raise RunError(f"{out}: the checkpoint records no run configuration; start fresh with --overwrite")
    changed = differences(saved, identity)
    if changed and not allow_changes:
        raise RunError(
            f"--resume: this run differs from the one in {out}: {'; '.join(changed)}. "
            "Pass --allow-changes to continue with the new values (the schedule is recomputed), or use "
            "another --out for a new run"
        )
    if changed:
        logger.warning("resuming at step %d with changes: %s", step, "; ".join(changed))
        record.setdefault("changes", []).append({"step": step, "changes": changed})
        record["identity"] = identity
        write_run_file(out, record)
    return record, changed
