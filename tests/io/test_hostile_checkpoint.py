"""Hostile checkpoints, configs and resume files: each refused with a message naming file and key (or field);
every writer leaves the previous files byte-identical when it fails half-way."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilora.errors import CheckpointError, CLIError, ConfigError
from minilora.io import checkpoint as ckpt_io
from minilora.io import safe_write
from minilora.loading import from_pretrained, save_quantized

KEY = "model.layers.0.mlp.up_proj.weight"


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(dst / "model.safetensors")
        edit(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_non_finite_weights_refused_with_file_key_and_count(hf_tiny_llama_dir, tmp_path, quantize):
    def poison(sd):
        sd[KEY][0, :3] = float("nan")
        sd[KEY][1, 0] = float("inf")

    d = _copy(hf_tiny_llama_dir, tmp_path / "m", poison)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d, quantize=quantize)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg and repr(KEY) in msg and "4 non-finite value(s)" in msg


def test_huge_finite_weights_name_the_key_instead_of_an_index_error(hf_tiny_llama_dir, tmp_path):
    d = _copy(hf_tiny_llama_dir, tmp_path / "m", lambda sd: sd[KEY].fill_(3e38))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: key '{KEY}': cannot quantize to nf4: .*overflows"):
        from_pretrained(d, quantize="nf4")
    from_pretrained(d, quantize="nf4", double_quant=False)  # without double quant the values fit


@pytest.mark.parametrize(
    "field, value",
    [("vocab_size", 0), ("hidden_size", -64), ("num_hidden_layers", 0), ("num_key_value_heads", 0),
     ("intermediate_size", 0), ("num_attention_heads", "four")],
)  # fmt: skip
def test_config_with_non_positive_sizes_names_path_and_field(hf_tiny_llama_dir, tmp_path, field, value):
    d = _copy(hf_tiny_llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        from_pretrained(d)
    assert str(d / "config.json") in str(e.value)
    assert field in str(e.value) or "num_attention_heads" in str(e.value)


@pytest.mark.parametrize("text", ["{", "[1, 2]", b"\xff\xfe{}"])
def test_config_that_is_no_json_object(hf_tiny_llama_dir, tmp_path, text):
    d = _copy(hf_tiny_llama_dir, tmp_path / "m")
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=str(d / "config.json")):
        from_pretrained(d)


def test_save_over_the_source_refused(hf_tiny_llama_dir, tmp_path):
    d = _copy(hf_tiny_llama_dir, tmp_path / "m")
    before = _snapshot(d)
    model = from_pretrained(d)
    for target in (d, d / "sub"):
        with pytest.raises(CLIError, match="overlaps the input"):
            ckpt_io.save_pretrained(model, target)
    q = from_pretrained(d, quantize="nf4")
    with pytest.raises(CLIError, match="overlaps the input"):
        save_quantized(q, d)
    assert _snapshot(d) == before


def _fail_after_first_file(monkeypatch):
    real = ckpt_io.save_file
    calls = []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", flaky)


@pytest.mark.parametrize("writer", ["save_pretrained", "save_quantized"])
def test_writer_failing_half_way_leaves_old_files_byte_identical(hf_tiny_llama_dir, tmp_path, monkeypatch, writer):
    model = from_pretrained(hf_tiny_llama_dir, quantize="nf4" if writer == "save_quantized" else None)
    save = ckpt_io.save_pretrained if writer == "save_pretrained" else save_quantized
    out = tmp_path / "out"
    save(model, out, max_shard_size=50_000)  # several shards + index
    before = _snapshot(out)
    assert len(before) > 3
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    _fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*model-00002-of"):
        save(model, out, max_shard_size=50_000)
    assert _snapshot(out) == before  # no new shard, no new config, no temp file left


def test_atomic_write_disk_full_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    target.write_bytes(b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_write.os, "fsync", full)
    with pytest.raises(OSError, match=f"no space left on the device while writing {target}") as e:
        safe_write.atomic_write_bytes(target, b"new")
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("name, content", [("tokenizer.json", b"{nope"), ("tokenizer_config.json", b"[1]")])
def test_broken_tokenizer_files_are_named(tmp_path, name, content):
    import tokenizers

    from minilora.io.tokenizer import Tokenizer

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=str(tmp_path / name)):
        Tokenizer.from_dir(tmp_path)


def test_truncated_gguf_is_named(tmp_path):
    from minilora.io.gguf import gguf_to_dir_cached

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(ValueError, match=str(bad)):
        gguf_to_dir_cached(bad, tmp_path / "cache")
