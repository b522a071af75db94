"""minilora <-> peft adapters on a tiny random Llama: same files, same logits, both directions.

The base model on the minilora side is transformers' LlamaForCausalLM and, once it exists, minilora's
own decoder (`minilora.loading.from_pretrained`); peft always runs on transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minilora.lora as ml
from tests.lora.lora_testutil import (
    ATTN,
    assert_logits_close,
    hf_model,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)

peft = pytest.importorskip("peft")

CASES = {
    "qkvo-r8": dict(r=8, lora_alpha=16, target_modules=ATTN),
    "qkvo-r32": dict(r=32, lora_alpha=64, target_modules=ATTN),
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, target_modules=ATTN, use_rslora=True),
    "dora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "rank-pattern": dict(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"o_proj": 3},
    ),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"),
    "layers-to-transform": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "full-paths-exclude": dict(
        r=4,
        lora_alpha=8,
        target_modules=["model.layers.0.self_attn.q_proj", "k_proj", "gate_proj"],
        exclude_modules=["model.layers.1.self_attn.k_proj"],
    ),
}

BASES = ["transformers", "minilora"]


def our_base(kind: str, path: Path) -> torch.nn.Module:
    return hf_model(path) if kind == "transformers" else minilora_model(path)


def peft_saved(tiny_llama_dir: Path, out: Path, case: dict) -> torch.Tensor:
    """Build the case with peft, randomize every adapter tensor, save it; return peft's logits."""
    model = peft.get_peft_model(hf_model(tiny_llama_dir), peft.LoraConfig(task_type="CAUSAL_LM", **case))
    randomize_adapters(model, seed=3)
    model.eval()
    with torch.no_grad():
        ref = logits(model, input_ids())
    model.save_pretrained(out)
    return ref


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_with_same_logits(tiny_llama_dir: Path, tmp_path: Path, case: str, base: str) -> None:
    ref = peft_saved(tiny_llama_dir, tmp_path / "peft", CASES[case])
    model = ml.load_adapter(our_base(base, tiny_llama_dir), tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "peft")
    # Same modules, same per-module r as peft chose (targeting and rank_pattern semantics).
    ours = {name: layer.settings["default"].r for name, layer in ml.lora_layers(model)}
    theirs = {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert ours == theirs
    with torch.no_grad():
        assert_logits_close(logits(model, input_ids()), ref)
    # The adapter changes the output: the comparison is not base vs base.
    with torch.no_grad(), ml.disable_adapters(model):
        assert (logits(model, input_ids()) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", ["qkvo-r8", "all-linear", "rslora", "dora", "rank-pattern", "regex"])
def test_minilora_adapter_loads_in_peft(tiny_llama_dir: Path, tmp_path: Path, case: str, base: str) -> None:
    kw = dict(CASES[case])
    model = ml.add_lora(
        our_base(base, tiny_llama_dir),
        r=kw.pop("r"),
        alpha=kw.pop("lora_alpha"),
        target_modules=kw.pop("target_modules"),
        **kw,
    )
    randomize_adapters(model, seed=5)
    with torch.no_grad():
        ours = logits(model, input_ids())
    ml.save_adapter(model, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_logits_close(logits(peft_model, input_ids()), ours)


def test_files_match_what_peft_writes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    case = dict(r=8, lora_alpha=16, target_modules=ATTN, use_dora=True, rank_pattern={"v_proj": 4})
    peft.get_peft_model(hf_model(tiny_llama_dir), peft.LoraConfig(task_type="CAUSAL_LM", **case)).save_pretrained(
        tmp_path / "peft"
    )
    model = ml.add_lora(
        hf_model(tiny_llama_dir),
        r=8,
        alpha=16,
        target_modules=ATTN,
        use_dora=True,
        rank_pattern={"v_proj": 4},
    )
    ml.save_adapter(model, tmp_path / "ours")

    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for key in set(theirs) - {"peft_version"}:
        value, expected = ours[key], theirs[key]
        if key == "target_modules":
            value, expected = sorted(value), sorted(expected)
        assert value == expected, key
    assert ours["peft_version"] == peft.__version__

    files = {}
    for side in ("peft", "ours"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), "pt") as f:
            files[side] = (
                f.metadata(),
                {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()},
            )
    assert files["ours"] == files["peft"]
    assert files["ours"][0] == {"format": "pt"}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in files["ours"][1]
    assert not list(tmp_path.glob("ours/*.tmp"))


def test_load_refuses_missing_and_misshaped_tensors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peft_saved(tiny_llama_dir, tmp_path / "good", CASES["qkvo-r8"])
    tensors = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    config = (tmp_path / "good" / "adapter_config.json").read_text()

    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(config)
    save_file({k: v for k, v in tensors.items() if k != missing_key}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=missing_key.replace(".", r"\.")):
        ml.load_adapter(hf_model(tiny_llama_dir), bad)

    wrong_key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    bad = tmp_path / "misshaped"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(config)
    save_file({**tensors, wrong_key: torch.zeros(8, 32)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.lora_A\.weight: file \(8, 32\), model expects \(8, 64\)"):
        ml.load_adapter(hf_model(tiny_llama_dir), bad)

    # A refused load leaves the model untouched.
    model = hf_model(tiny_llama_dir)
    with pytest.raises(ValueError):
        ml.load_adapter(model, bad)
    assert not ml.lora_layers(model)


def test_load_ignores_unknown_config_keys_and_accepts_suffixes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ref = peft_saved(tiny_llama_dir, tmp_path / "a", CASES["all-linear"])
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    assert all(name.startswith("model.layers.") for name in data["target_modules"])  # peft wrote full paths
    data["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    data["some_future_peft_option"] = {"x": 1}
    del data["megatron_core"]
    path.write_text(json.dumps(data))
    model = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path / "a")
    with torch.no_grad():
        assert_logits_close(logits(model, input_ids()), ref)


def test_loaded_adapter_is_frozen_unless_trainable(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peft_saved(tiny_llama_dir, tmp_path / "a", CASES["qkvo-r8"])
    frozen = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path / "a")
    assert ml.count_parameters(frozen)[0] == 0
    model = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path / "a", trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_trainable_parameters_line_matches_peft(tiny_llama_dir: Path) -> None:
    for case in ("qkvo-r32", "dora", "rank-pattern"):
        kw = dict(CASES[case])
        peft_model = peft.get_peft_model(hf_model(tiny_llama_dir), peft.LoraConfig(task_type="CAUSAL_LM", **kw))
        trainable, total = peft_model.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        expected = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
        model = ml.add_lora(
            hf_model(tiny_llama_dir),
            r=kw.pop("r"),
            alpha=kw.pop("lora_alpha"),
            target_modules=kw.pop("target_modules"),
            **kw,
        )
        assert ml.print_trainable_parameters(model) == expected, case
        nbytes = sum(t.numel() * t.element_size() for t in ml.adapter_state_dict(model).values())
        assert ml.adapter_nbytes(model) == nbytes == 4 * trainable
