"""Quantize-on-load and bitsandbytes checkpoints, against transformers + bitsandbytes on CPU.

For NF4 / FP4 (with and without double quant) and LLM.int8:
- minilora quantizing a float checkpoint on load gives the logits transformers + bitsandbytes give when
  loading the same checkpoint with the matching BitsAndBytesConfig, and writes the same bytes;
- a minilora-saved quantized checkpoint loads in transformers + bitsandbytes with equal logits;
- a transformers-saved quantized checkpoint loads in minilora with equal logits.
transformers' quantized model is saved before any forward (formats.md section 7: bitsandbytes' CPU
forward may repack the weight in place).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minilora import nn as quant_nn
from minilora.io.checkpoint import CheckpointError
from minilora.loading import QUANTIZABLE, from_pretrained, save_quantized

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

VOCAB = 128
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])


def tiny_hf(family: str) -> "transformers.PreTrainedModel":
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,  # in_features multiple of 64: bitsandbytes CPU forward repacks per 64 columns
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=family == "qwen2",
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def bnb_config(quantize: str, double_quant: bool) -> "transformers.BitsAndBytesConfig":
    if quantize == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )


def float32_reference(model: "transformers.PreTrainedModel") -> "transformers.PreTrainedModel":
    """Keep bitsandbytes on its float32 dequantize + matmul path.

    On CPUs with AVX512-BF16, bitsandbytes' Linear4bit eval forward repacks the weight and rounds absmax
    to bfloat16 (logits then move by ~1e-3); that fast path is not the format minilora reproduces.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def hf_quantized(path, quantize: str, double_quant: bool) -> "transformers.PreTrainedModel":
    return float32_reference(
        transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(quantize, double_quant), device_map="cpu", dtype=torch.float32
        )
    )


def hf_logits(model: "transformers.PreTrainedModel") -> torch.Tensor:
    positions = (MASK.cumsum(-1) - 1).masked_fill(MASK == 0, 0)
    with torch.no_grad():
        return model(IDS, attention_mask=MASK, position_ids=positions).logits * MASK[..., None]


def our_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, attention_mask=MASK) * MASK[..., None]


CASES = [
    ("llama", "nf4", True),
    ("llama", "nf4", False),
    ("llama", "fp4", True),
    ("llama", "fp4", False),
    ("qwen2", "nf4", True),
    ("llama", "int8", False),
    ("qwen2", "int8", False),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def setup(request, tmp_path_factory):
    family, quantize, double_quant = request.param
    root = tmp_path_factory.mktemp("-".join(map(str, request.param)))
    tiny_hf(family).save_pretrained(root / "float")
    reference = hf_quantized(root / "float", quantize, double_quant)
    reference.save_pretrained(root / "hf_quantized")  # before any forward
    expected = reference_logits(reference, quantize)
    expected_int8_eval = hf_logits(reference.eval()) if quantize == "int8" else None
    ours = from_pretrained(root / "float", quantize=quantize, double_quant=double_quant)
    return root, quantize, double_quant, expected, ours, expected_int8_eval


def reference_logits(model: "transformers.PreTrainedModel", quantize: str) -> torch.Tensor:
    """transformers + bitsandbytes logits on the float32 dequantize-then-matmul path.

    For 8-bit that is the training-mode path of bitsandbytes on CPU (MatMul8bitFp: x @ dequant(W).T);
    minilora's Linear8bit computes the same with threshold 0. The eval path (int8 activations, outlier
    columns, a float16 cast) is compared separately in test_int8_outlier_forward_matches_bnb_eval.
    """
    if quantize == "int8":
        model.train()  # no dropout in these models; only switches bitsandbytes' CPU matmul path
    logits = hf_logits(model)
    model.eval()
    return logits


def our_model_logits(model: torch.nn.Module, quantize: str) -> torch.Tensor:
    """Logits of a minilora model; 8-bit layers run weight-only (threshold 0: x @ dequant(W).T)."""
    int8_layers = [m for m in model.modules() if isinstance(m, quant_nn.Linear8bit)]
    saved = [m.threshold for m in int8_layers]
    for module in int8_layers:
        module.threshold = 0.0
    try:
        return our_logits(model)
    finally:
        for module, threshold in zip(int8_layers, saved, strict=True):
            module.threshold = threshold


def test_quantize_on_load_matches_transformers_bnb(setup):
    _, quantize, _, expected, ours, _ = setup
    kind = quant_nn.Linear8bit if quantize == "int8" else quant_nn.Linear4bit
    for name, module in ours.named_modules():
        if name.rsplit(".", 1)[-1] in QUANTIZABLE:
            assert isinstance(module, kind), name
    assert type(ours.lm_head) is torch.nn.Linear and type(ours.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(our_model_logits(ours, quantize), expected, atol=1e-4, rtol=0)


def test_int8_outlier_forward_matches_bnb_eval(setup):
    _, quantize, _, _, _, expected_eval = setup
    if quantize != "int8":
        pytest.skip("8-bit only")
    root = setup[0]
    ours = from_pretrained(root / "float", quantize="int8")  # threshold 6.0, as transformers
    torch.testing.assert_close(our_logits(ours), expected_eval, atol=1e-4, rtol=0)


def test_saved_bytes_equal_transformers(setup, tmp_path):
    root, _, _, _, ours, _ = setup
    save_quantized(ours, tmp_path)
    theirs = load_file(root / "hf_quantized" / "model.safetensors")
    mine = load_file(tmp_path / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key, tensor in theirs.items():
        if ".quant_state." in key:  # JSON blob: compare parsed, key order may differ
            parse = lambda t: json.loads(bytes(t.tolist()).decode())  # noqa: E731
            assert parse(mine[key]) == parse(tensor), key
        else:
            assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), key


def test_minilora_saved_checkpoint_loads_in_transformers(setup, tmp_path):
    _, quantize, double_quant, expected, ours, _ = setup
    save_quantized(ours, tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    if quantize != "int8":
        assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == (quantize, double_quant)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    torch.testing.assert_close(reference_logits(float32_reference(reloaded), quantize), expected, atol=1e-4, rtol=0)
    again = from_pretrained(tmp_path)
    torch.testing.assert_close(our_logits(again), our_logits(ours), atol=0, rtol=0)


def test_transformers_saved_checkpoint_loads_in_minilora(setup):
    root, quantize, _, expected, ours, _ = setup
    loaded = from_pretrained(root / "hf_quantized")
    torch.testing.assert_close(our_logits(loaded), our_logits(ours), atol=0, rtol=0)  # same bytes, same model
    torch.testing.assert_close(our_model_logits(loaded, quantize), expected, atol=1e-4, rtol=0)
    same = from_pretrained(root / "hf_quantized", quantize=quantize)
    torch.testing.assert_close(our_model_logits(same, quantize), expected, atol=1e-4, rtol=0)
    other = "fp4" if quantize != "fp4" else "nf4"
    with pytest.raises(ValueError, match="already quantized"):
        from_pretrained(root / "hf_quantized", quantize=other)


def test_quantized_checkpoint_with_missing_key_is_refused(setup, tmp_path):
    root, quantize, _, _, _, _ = setup
    ckpt = tmp_path / "broken"
    shutil.copytree(root / "hf_quantized", ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    victim = "model.layers.1.self_attn.v_proj." + ("SCB" if quantize == "int8" else "weight.absmax")
    del tensors[victim]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    pattern = "v_proj.weight' is torch.int8" if quantize == "int8" else "v_proj: missing.*absmax"
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*" + pattern):
        from_pretrained(ckpt)
