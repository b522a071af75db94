"""Checkpoint files: atomic writes, round trips through transformers, and every bad-input refusal.

Bad inputs (each must raise an error naming the file and the key, never return a model): a truncated
or corrupted safetensors file, a missing shard, a missing key, an unexpected key, a wrong shape, an
unknown model_type, and a pickle checkpoint without ``allow_pickle=True``.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minilora.io.checkpoint import (
    CheckpointError,
    CheckpointReader,
    save_checkpoint,
    save_pretrained,
    save_safetensors,
)
from minilora.loading import from_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 128


def tiny_hf_llama(tie: bool = False) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_and_dirs(tmp_path_factory):
    hf = tiny_hf_llama()
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(single)
    hf.save_pretrained(sharded, max_shard_size="40KB")
    return hf, single, sharded


def copy_of(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- writing
def test_save_safetensors_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(3, dtype=torch.bfloat16)}  # a: strided
    save_safetensors(tensors, path, metadata={"note": "x"})
    save_safetensors({"a": torch.zeros(1)}, path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]  # no temp file left
    assert torch.equal(load_file(path)["a"], torch.zeros(1))
    save_safetensors(tensors, path, metadata={"note": "x"})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert torch.equal(f.get_tensor("a"), tensors["a"])


def test_save_checkpoint_shards_with_index(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    files = save_checkpoint(tensors, tmp_path, max_shard_size=900)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    with CheckpointReader(tmp_path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(tensors)
        assert ckpt.shape("t4") == (100,) and ckpt.dtype("t4") == torch.float32
        assert torch.equal(ckpt.get("t3"), tensors["t3"])
    save_checkpoint(tensors, tmp_path)  # back to one file: the stale index goes away
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("shard", [None, 30_000])
@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, hf_and_dirs, shard, tie):
    hf = tiny_hf_llama(tie=tie)
    hf.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src")
    save_pretrained(ours, tmp_path / "out", max_shard_size=shard)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (shard is not None)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    mine = from_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = hf(IDS).logits
        torch.testing.assert_close(again(IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine(IDS), expected, atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_as_float32_or_as_stored(tmp_path, hf_and_dirs):
    hf = hf_and_dirs[0]
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.float()
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.float32
    kept = from_pretrained(tmp_path, dtype=None)
    assert kept.lm_head.weight.dtype == torch.bfloat16
    assert kept(IDS).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- bad input
def test_truncated_safetensors(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupted)"):
        from_pretrained(ckpt)


def test_corrupted_header(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[10:20] = b"\x00" * 10  # inside the JSON header
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(ckpt)


def test_corrupted_shard(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[2], tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        from_pretrained(ckpt)


def test_missing_shard(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[2], tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}.*index\.json.*key"):
        from_pretrained(ckpt)


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_key(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing key 'model\.layers\.1\.mlp\.up_proj"):
        from_pretrained(ckpt)


def test_missing_key_in_sharded_index(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[2], tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: missing key 'model\.norm\.weight'"):
        from_pretrained(ckpt)


def test_unexpected_key(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    rewrite(ckpt / "model.safetensors", lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'model\.layers\.2\.mlp"):
        from_pretrained(ckpt)


def test_index_pointing_at_wrong_shard(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[2], tmp_path)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{key}.*{shards[1]}|{shards[1]}.*{key}"):
        from_pretrained(ckpt)


def test_wrong_shape(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    rewrite(
        ckpt / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(32, 32)})
    )
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: key 'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[32, 32\].*\[32, 64\]",
    ):
        from_pretrained(ckpt)


def test_unknown_model_type(tmp_path, hf_and_dirs):
    ckpt = copy_of(hf_and_dirs[1], tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gemma"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*'gemma'"):
        from_pretrained(ckpt)


def test_pickle_refused_unless_allowed(tmp_path, hf_and_dirs):
    hf, single, _ = hf_and_dirs
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(single / "config.json", ckpt / "config.json")
    torch.save(hf.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        from_pretrained(ckpt)
    model = from_pretrained(ckpt, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-4, rtol=0)


def test_pickle_with_code_is_not_executed(tmp_path, hf_and_dirs):
    """weights_only=True: a pickle that would call a function is rejected even with allow_pickle."""
    single = hf_and_dirs[1]
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    shutil.copy(single / "config.json", ckpt / "config.json")
    torch.save({"model.norm.weight": torch.ones(64), "x": shutil.rmtree}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        from_pretrained(ckpt, allow_pickle=True)


def test_no_weights_at_all(tmp_path, hf_and_dirs):
    ckpt = tmp_path / "empty"
    ckpt.mkdir()
    shutil.copy(hf_and_dirs[1] / "config.json", ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        from_pretrained(ckpt)


def test_get_on_casts_floating_tensors_only(tmp_path):
    """get_on(key, device, dtype) on the CPU: floats cast as `.to(dtype)` would, integers keep their dtype (the
    GPU path, piece by piece, is tests/kernels/test_gpu_loading.py)."""
    tensors = {"w": torch.randn(33, 7), "h": torch.randn(5).to(torch.float16), "i": torch.arange(9)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as ckpt:
        for key, stored in tensors.items():
            got = ckpt.get_on(key, "cpu", torch.bfloat16)
            want = stored.to(torch.bfloat16) if stored.is_floating_point() else stored
            assert got.dtype == want.dtype and torch.equal(got, want), key
            assert ckpt.get_on(key, "cpu").dtype == stored.dtype
