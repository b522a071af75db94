"""`minilora finetune` as a user meets it: options in any order, `python -m minilora`, an example in every
--help, log lines without a progress bar, runs that cannot be mixed up, and an adapter peft loads by its
config alone (the base found through base_model_name_or_path) with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from minilora.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"The kettle costs ${10 + i}.00"}) + "\n" for i in range(12)))
    return path


def test_python_m_minilora_help_and_an_example_in_every_command() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "minilora", "--help"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: minilora")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        text = parser.format_help()
        assert "example:\n  minilora " + name in text, name


def test_generate_takes_the_prompt_after_options(tiny: Path, capsys) -> None:
    assert main(["generate", str(tiny), "--max-new-tokens", "3", "Price is $"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(tiny), "Price is $", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == first
    assert main(["generate", str(tiny), "--prompt", "Price is $", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == first and len(first) == 4  # three byte tokens and the newline


def test_finetune_log_lines_and_runs_that_cannot_be_mixed_up(tiny: Path, text_data: Path, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["finetune", str(tiny), "--data", str(text_data), "--out", str(out), "--quantize", "none"]
    argv += ["--steps", "4", "--batch-size", "4", "--no-progress", "--log-every", "2", "--eval-split", "0.25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{text_data}: 9 records (text, loss on all) -> 9 examples" in printed
    assert "trainable params: " in printed
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" tokens/s | ETA " in line and " | memory " in line for line in lines)

    assert main(argv) == 1  # the same out again, without --resume
    assert "already holds run" in capsys.readouterr().err
    assert main([*argv, "--resume", "--lr", "1e-3"]) == 1
    assert "train.lr: 0.0015 -> 0.001" in capsys.readouterr().err
    assert main([*argv, "--resume", "--lr", "1e-3", "--steps", "6", "--allow-changes"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from step 4" in printed and "changed on resume (--allow-changes): train.lr" in printed
    card = (out / "adapter" / "README.md").read_text()
    assert f'base_model: "{tiny.resolve()}"' in card and "library_name: peft" in card
    assert "final train loss" in card and "| r | `32` |" in card


def test_peft_loads_the_adapter_by_its_config_alone(tiny: Path, text_data: Path, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from minilora.loading import from_pretrained
    from minilora.lora import load_adapter

    out = tmp_path / "run"
    argv = ["finetune", str(tiny), "--data", str(text_data), "--out", str(out), "--quantize", "none"]
    assert main([*argv, "--steps", "3", "--batch-size", "4", "--no-progress", "--r", "4", "--lr", "1e-2"]) == 0
    adapter = out / "adapter"
    cfg = peft.PeftConfig.from_pretrained(str(adapter))
    assert cfg.base_model_name_or_path == str(tiny.resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path)
    theirs = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    ours = load_adapter(from_pretrained(tiny), adapter).eval()
    ids = torch.tensor([[256, 84, 104, 101, 32, 107, 101, 116, 116, 108, 101]])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(ids)
        with theirs.disable_adapter():
            plain = theirs(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the trained adapter changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
