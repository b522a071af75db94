"""The safe writers: an output over an input is refused, a failure half-way leaves the old files whole."""

from __future__ import annotations

import pytest

from minilora.errors import CLIError
from minilora.io.safe_write import check_output, lock, output_directory


def test_check_output_refuses_overlap(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for bad in (base, base / "merged", tmp_path):
        with pytest.raises(CLIError, match="overlaps the input"):
            check_output(bad, [base])
    check_output(tmp_path / "elsewhere", [base, None])


def test_failure_half_way_keeps_old_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with output_directory(out) as tmp:
            (tmp / "a.bin").write_bytes(b"new, half")
            raise RuntimeError("disk full")
    assert (out / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir, no lock left behind


def test_success_replaces_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    with output_directory(out) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_writer_is_refused(tmp_path):
    with lock(tmp_path / "out"):
        with pytest.raises(CLIError, match="another process"):
            with output_directory(tmp_path / "out"):
                pass
