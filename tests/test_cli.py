"""The minilora command: --help everywhere, one-line errors with non-zero exit, and the smoke demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.cli import build_parser, main

COMMANDS = ["demo", "finetune", "generate", "merge", "footprint", "quantize", "bench"]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_works_for_every_command(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: minilora" in out
    if command is None:
        for c in COMMANDS:
            assert c in out


def test_every_subcommand_is_wired():
    parser = build_parser()
    for command in COMMANDS:
        assert callable(parser.parse_args([command] + _required(command)).func)


def _required(command: str) -> list[str]:
    return {
        "finetune": ["m", "--data", "d.jsonl"],
        "generate": ["m"],
        "merge": ["m", "a", "--out", "o"],
        "footprint": ["m"],
        "quantize": ["m", "--out", "o"],
    }.get(command, [])


def test_bad_paths_give_one_clear_line_and_exit_1(tmp_path, capsys):
    rc = main(["finetune", str(tmp_path / "no-model"), "--data", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("minilora finetune: error:") and "missing.jsonl" in err

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    rc = main(["finetune", str(tmp_path / "no-model"), "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "no-model" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    assert main(["finetune", "x", "--data", str(bad)]) == 1
    assert "bad.jsonl:1: missing field(s) ['completion']" in capsys.readouterr().err

    assert main(["finetune", "x", "--data", str(data), "--cuda-graph", "--device", "cpu"]) == 1
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err

    assert main(["generate", str(tmp_path / "nothing.gguf"), "--prompt", "hi"]) == 1
    assert "nothing.gguf" in capsys.readouterr().err
    # a bad sampling setting is named before any model is looked for
    assert main(["generate", str(tmp_path / "nothing.gguf"), "--prompt", "hi", "--temperature", "nan"]) == 1
    err = capsys.readouterr().err
    assert "temperature must be a finite number" in err and "nothing.gguf" not in err


def test_finetune_generate_merge_quantize_on_a_tiny_model(tmp_path, capsys):
    from minilora.testing.tiny import make_tiny_model_dir
    from minilora.train.data import write_jsonl
    from minilora_demo.price import split_products

    model = make_tiny_model_dir(tmp_path / "tiny")
    train_p, _, _ = split_products(16, 0, 0)
    write_jsonl([p.record() for p in train_p], tmp_path / "train.jsonl")
    out = tmp_path / "ft"
    argv = ["finetune", str(model), "--data", str(tmp_path / "train.jsonl"), "--out", str(out)]
    assert main([*argv, "--steps", "4", "--batch-size", "4", "--save-every", "2", "--no-progress"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    capsys.readouterr()
    assert main(["generate", str(model), "--adapter", str(out / "adapter"), "--prompt", "Price is $",
                 "--max-new-tokens", "5"]) == 0  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")

    assert main(["merge", str(model), str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    assert main(["quantize", str(model), "--out", str(tmp_path / "q")]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["load_in_4bit"] is True


def test_demo_smoke_runs_end_to_end(tmp_path):
    """CI's short demo: the console entry point, a tiny random model, the whole pipeline."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "minilora.cli", "demo", "--smoke", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_identical"] is True
    assert summary["train"]["final_loss"] < summary["train"]["first_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "train" / "metrics.jsonl").is_file()
    assert "fine-tuned model: MAE" in proc.stdout and "memory of what was trained" in proc.stdout
    if summary["loss_curve"]:
        assert Path(summary["loss_curve"]).stat().st_size > 1000
