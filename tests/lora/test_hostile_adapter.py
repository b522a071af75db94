"""Hostile adapter directories: each refused by load_adapter with an AdapterError naming the file and key or
field; save_adapter failing half-way leaves the previous adapter byte-identical."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilora.errors import AdapterError
from minilora.io import safe_write
from minilora.loading import from_pretrained
from minilora.lora import add_lora, load_adapter, peft_io, save_adapter

FIRST = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    model = from_pretrained(tiny_llama_dir)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, path)
    return path


def _broken(adapter_dir: Path, tmp_path: Path, tensors=None, config=None, raw=None) -> Path:
    d = tmp_path / "broken"
    shutil.copytree(adapter_dir, d)
    if tensors is not None:
        sd = load_file(d / peft_io.WEIGHTS_NAME)
        tensors(sd)
        save_file(sd, d / peft_io.WEIGHTS_NAME, metadata={"format": "pt"})
    if config is not None:
        data = json.loads((d / peft_io.CONFIG_NAME).read_text())
        config(data)
        (d / peft_io.CONFIG_NAME).write_text(json.dumps(data))
    if raw is not None:
        name, content = raw
        (d / name).write_bytes(content)
    return d


def _int(sd):
    for k in sd:
        sd[k] = (sd[k] * 100).to(torch.int32)


def _nan(sd):
    sd[FIRST][0, :2] = float("nan")
    sd[FIRST][1, 0] = float("-inf")


CASES = {
    "integer tensors": (dict(tensors=_int), [peft_io.WEIGHTS_NAME, FIRST, "torch.int32"]),
    "NaN weights": (dict(tensors=_nan), [peft_io.WEIGHTS_NAME, FIRST, "3 non-finite"]),
    "lora_alpha 0": (dict(config=lambda c: c.update(lora_alpha=0)), [peft_io.CONFIG_NAME, "lora_alpha=0", "nothing"]),
    "alpha_pattern NaN": (
        dict(config=lambda c: c.update(alpha_pattern={"q_proj": float("nan")})),
        [peft_io.CONFIG_NAME, "alpha_pattern['q_proj']=nan"],
    ),
    "r 0": (dict(config=lambda c: c.update(r=0)), [peft_io.CONFIG_NAME, "r=0"]),
    "config not JSON": (dict(raw=(peft_io.CONFIG_NAME, b"{r: 4")), [peft_io.CONFIG_NAME, "not valid UTF-8 JSON"]),
    "config a list": (dict(raw=(peft_io.CONFIG_NAME, b"[4]")), [peft_io.CONFIG_NAME, "expected a JSON object"]),
    "truncated weights": (dict(raw=(peft_io.WEIGHTS_NAME, b"\x10\x00\x00\x00")), [peft_io.WEIGHTS_NAME, "truncated"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_names_the_culprit(tiny_llama_dir, adapter_dir, tmp_path, case):
    edits, expected = CASES[case]
    d = _broken(adapter_dir, tmp_path, **edits)
    model = from_pretrained(tiny_llama_dir)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, d)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing was added to the model


def test_save_adapter_failing_half_way_keeps_the_old_adapter(tiny_llama_dir, adapter_dir, tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    shutil.copytree(adapter_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    model = from_pretrained(tiny_llama_dir)
    add_lora(model, r=2, alpha=16, target_modules=["k_proj"])
    real, calls = safe_write.write_bytes, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) > 1:  # the weights are written, the config fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(peft_io, "write_bytes", flaky)
    with pytest.raises(OSError, match=f"no space left on the device while writing {d / peft_io.CONFIG_NAME}"):
        save_adapter(model, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
