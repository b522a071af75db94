"""The CLI against hostile inputs: --out over an input refused with the input intact, a failure half-way
keeps the old --out, and every error family ends in exit status 1 and one readable line naming the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minilora.cli import main
from minilora.io import checkpoint as ckpt_io
from minilora.loading import from_pretrained
from minilora.lora import add_lora, save_adapter


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def base_and_adapter(hf_tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(hf_tiny_llama_dir, base)
    model = from_pretrained(base)
    add_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minilora {command}: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("where", ["base", "base/merged", "."])
def test_merge_and_quantize_refuse_out_over_the_base(base_and_adapter, capsys, where):
    base, adapter = base_and_adapter
    out = base.parent if where == "." else base.parent / where
    before = _tree(base)
    assert main(["merge", str(base), str(adapter), "--out", str(out)]) == 1
    assert "overlaps the input" in _one_error_line(capsys, "merge")
    assert main(["quantize", str(base), "--out", str(out)]) == 1
    assert "overlaps the input" in _one_error_line(capsys, "quantize")
    assert _tree(base) == before


def test_merge_into_the_adapter_refused(base_and_adapter, capsys):
    base, adapter = base_and_adapter
    before = _tree(adapter)
    assert main(["merge", str(base), str(adapter), "--out", str(adapter)]) == 1
    assert f"overlaps the input {adapter}" in _one_error_line(capsys, "merge")
    assert _tree(adapter) == before


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_failure_half_way_keeps_the_old_out(base_and_adapter, tmp_path, capsys, monkeypatch, command):
    base, adapter = base_and_adapter
    out = tmp_path / "out"
    argv = ["merge", str(base), str(adapter), "--out", str(out)] if command == "merge" else [
        "quantize", str(base), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    before = _tree(out)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", fail)
    capsys.readouterr()
    assert main(argv) == 1
    assert "no space left on the device while writing" in _one_error_line(capsys, command)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no temp dir, no lock


def test_each_family_is_one_line_and_exit_1(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    cases = []
    # CheckpointError: NaN in a weight
    nan = tmp_path / "nan"
    shutil.copytree(base, nan)
    sd = ckpt_io.load_state_dict(nan)
    sd["model.norm.weight"][0] = float("nan")
    ckpt_io.save_checkpoint(sd, nan)
    cases.append((["quantize", str(nan), "--out", str(tmp_path / "q")], "model.norm.weight"))
    # ConfigError: zero vocabulary
    zero = tmp_path / "zero"
    shutil.copytree(base, zero)
    config = json.loads((zero / "config.json").read_text())
    (zero / "config.json").write_text(json.dumps({**config, "vocab_size": 0}))
    merge_zero = ["merge", str(zero), str(adapter), "--out", str(tmp_path / "m0")]
    cases.append((merge_zero, f"{zero / 'config.json'}: vocab_size=0"))
    # AdapterError: zero scale
    bad = tmp_path / "bad-adapter"
    shutil.copytree(adapter, bad)
    adapter_config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**adapter_config, "lora_alpha": 0}))
    cases.append((["merge", str(base), str(bad), "--out", str(tmp_path / "m")], "lora_alpha=0"))
    # CLIError: out over an input
    cases.append((["quantize", str(base), "--out", str(base)], "overlaps the input"))
    for argv, culprit in cases:
        assert main(argv) == 1, argv
        assert culprit in _one_error_line(capsys, argv[0])
    with pytest.raises(ValueError, match="vocab_size=0"):  # --debug: the traceback
        main(["--debug", *merge_zero])
