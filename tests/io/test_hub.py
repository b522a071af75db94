"""Model reference resolution: local directories, and hub ids served from the local Hugging Face cache.

No network: a hub cache is laid out on disk as huggingface_hub lays it out
(``models--owner--name/{refs/main, snapshots/<commit>/...}``) and resolved with HF_HUB_OFFLINE=1.
"""

import shutil

import pytest
import torch

from minilora.io.hub import resolve_model_dir
from minilora.loading import from_pretrained

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_checkpoint(path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def fake_hub_cache(cache, repo_id, source):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_local_directory_is_returned_as_is(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_missing_local_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve_model_dir(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_model_dir("./nope")


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="f.txt"):
        resolve_model_dir(tmp_path / "f.txt")


def test_hub_id_offline_resolves_from_cache_and_loads(tmp_path, monkeypatch):
    model = tiny_checkpoint(tmp_path / "src")
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "someone/tiny-llama", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("someone/tiny-llama", cache_dir=cache) == snapshot

    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # the default cache_dir, read per call
    loaded = from_pretrained("someone/tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids).logits, atol=1e-4, rtol=0)


def test_hub_id_offline_not_cached_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"someone/absent.*not in the local Hugging Face cache.*offline"):
        resolve_model_dir("someone/absent", cache_dir=tmp_path)


def test_local_files_only_without_offline_env(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        resolve_model_dir("someone/absent", cache_dir=tmp_path, local_files_only=True)
