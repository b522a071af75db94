"""The CUDA-graphed training step (minilora.train.cuda_graph).

On any machine: the argument checks, and the model's `checkpoint_fn` hook (a replacement checkpoint gives
the same gradients as torch.utils.checkpoint).
On CUDA (`pytest -m gpu tests/train/test_cuda_graph.py`):
- GraphSafeCheckpoint: the recompute sees the forward's dropout masks (gradients equal those of the same
  forward run without checkpointing);
- CUDAGraphStep: replayed steps equal eager steps (losses and final adapters), the warm-up leaves no trace,
  each replay draws fresh dropout masks that the recompute reproduces, and a replaced learning rate is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minilora.lora import add_lora
from minilora.models import LlamaForCausalLM, ModelConfig
from minilora.nn import Linear4bit, replace_linears
from minilora.train.cuda_graph import CUDAGraphStep, GraphSafeCheckpoint


def _tiny_model(device: str, dropout: float, quantized: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    model = LlamaForCausalLM(cfg).to(device)
    if quantized:
        for layer in model.model.layers:
            replace_linears(layer, lambda name, lin: Linear4bit.from_linear(lin, compute_dtype=torch.float32))
    add_lora(model, r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=dropout)
    for name, p in model.named_parameters():  # lora_B starts at zero; make the adapters matter from step 0
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    model.gradient_checkpointing = True
    model.train()
    return model


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]  # (B, T-1, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _adapter(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- any machine ------------------------------------------------------------------------------------------


def test_refuses_an_optimizer_that_is_not_capturable() -> None:
    model = _tiny_model("cpu", 0.0, quantized=False)
    with pytest.raises(ValueError, match="capturable"):
        CUDAGraphStep(model, torch.optim.AdamW(_adapter(model), lr=1e-3), _loss)


def test_refuses_parameters_off_cuda() -> None:
    model = _tiny_model("cpu", 0.0, quantized=False)
    opt = torch.optim.AdamW(_adapter(model), lr=1e-3, capturable=True)
    with pytest.raises(ValueError, match="needs CUDA"):
        CUDAGraphStep(model, opt, _loss)
    with pytest.raises(ValueError, match="CUDA devices"):
        GraphSafeCheckpoint("cpu")


def test_checkpoint_fn_hook_is_used_and_gives_the_same_gradients() -> None:
    from torch.utils.checkpoint import checkpoint

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _tiny_model("cpu", 0.0, quantized=False)
    _loss(model, ids).backward()
    expected = [p.grad.clone() for p in _adapter(model)]
    model.zero_grad(set_to_none=True)
    calls = []

    def my_checkpoint(layer: nn.Module, *inputs: object) -> torch.Tensor:
        calls.append(layer.self_attn.layer_idx)
        return checkpoint(layer, *inputs, use_reentrant=False)

    model.model.checkpoint_fn = my_checkpoint
    _loss(model, ids).backward()
    assert calls == [0, 1, 2]
    for got, want in zip((p.grad for p in _adapter(model)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_graph_safe_checkpoint_recompute_sees_the_forward_masks() -> None:
    model = _tiny_model("cuda", 0.5)
    ids = torch.randint(0, 256, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    ckpt = GraphSafeCheckpoint("cuda", seed=7)
    model.model.checkpoint_fn = ckpt
    _loss(model, ids).backward()
    got = [p.grad.clone() for p in _adapter(model)]
    model.zero_grad(set_to_none=True)
    # The same forward without checkpointing, drawing from identically seeded states.
    plain = GraphSafeCheckpoint("cuda", seed=7)
    model.model.checkpoint_fn = plain.run_forward
    _loss(model, ids).backward()
    for a, b in zip(got, (p.grad for p in _adapter(model)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # And the masks really are random: another seed gives other gradients.
    model.zero_grad(set_to_none=True)
    model.model.checkpoint_fn = GraphSafeCheckpoint("cuda", seed=8)
    _loss(model, ids).backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(got, _adapter(model), strict=True))


@pytest.mark.gpu
def test_replayed_steps_equal_eager_steps() -> None:
    data = [
        torch.randint(0, 256, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(i))
        for i in range(5)
    ]
    # With dropout: the replays draw the masks that eager steps with an alike-seeded GraphSafeCheckpoint draw.
    graphed, eager = _tiny_model("cuda", 0.3), _tiny_model("cuda", 0.3)
    eager.model.checkpoint_fn = GraphSafeCheckpoint("cuda", seed=5)
    before = [p.detach().clone() for p in _adapter(graphed)]
    step = CUDAGraphStep(
        graphed, torch.optim.AdamW(_adapter(graphed), lr=1e-2, capturable=True), _loss, max_grad_norm=1.0, seed=5
    )
    opt = torch.optim.AdamW(_adapter(eager), lr=1e-2, capturable=True)
    for ids in data:
        got = step(ids).clone()  # equal from step 0: the warm-up before capture left no trace
        loss = _loss(eager, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(_adapter(eager), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=1e-6)
    for a, b, c in zip(_adapter(graphed), _adapter(eager), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not torch.equal(a, c)  # and training did move them
    assert len(step.graphs) == 1


@pytest.mark.gpu
def test_each_replay_draws_fresh_masks_that_the_recompute_reproduces() -> None:
    model = _tiny_model("cuda", 0.5)
    ids = torch.randint(0, 256, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    step = CUDAGraphStep(model, torch.optim.AdamW(_adapter(model), lr=0.0, capturable=True), _loss, seed=11)
    ckpt = step.checkpointer
    assert ckpt is not None
    step(ids)  # the capture creates the sites
    losses = []
    for _ in range(3):
        # Copies of the forward states as they stand before this replay: a plain forward run under them
        # must give the replay's gradients (lr = 0: the adapters never move).
        snapshot = {module.self_attn.layer_idx: fwd.clone_state() for module, fwd, _ in ckpt.sites.values()}
        loss = step(ids).clone()
        graph_grads = [p.grad.clone() for p in _adapter(model)]
        losses.append(float(loss))

        def plain(layer: nn.Module, *inputs: object, snapshot: dict = snapshot) -> torch.Tensor:
            return ckpt._with_state(snapshot[layer.self_attn.layer_idx], layer, inputs)

        model.model.checkpoint_fn = None  # (generators do not deep-copy)
        twin = copy.deepcopy(model)
        model.model.checkpoint_fn = ckpt
        twin.model.checkpoint_fn = plain
        twin.zero_grad(set_to_none=True)
        ref_loss = _loss(twin, ids)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(graph_grads, _adapter(twin), strict=True):
            torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-6)
    assert len(set(losses)) == 3, losses  # fresh dropout masks at every replay


@pytest.mark.gpu
def test_a_replaced_learning_rate_is_refused() -> None:
    model = _tiny_model("cuda", 0.0)
    opt = torch.optim.AdamW(_adapter(model), lr=1e-3, capturable=True)
    step = CUDAGraphStep(model, opt, _loss)
    ids = torch.randint(0, 256, (2, 16), device="cuda")
    step(ids)
    step.set_lr(5e-4)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(5e-4)
    opt.param_groups[0]["lr"] = 1e-4  # what LambdaLR would do
    with pytest.raises(ValueError, match="set_lr"):
        step(ids)


_HOST_SYNC_SCRIPT = """
import torch
from tests.train.test_cuda_graph import CUDAGraphStep, _adapter, _loss, _tiny_model
model = _tiny_model("cuda", 0.0)
def syncing_loss(m, ids):
    loss = _loss(m, ids)
    if loss.item() < 0:  # a host synchronisation: fine eagerly, not in a graph
        raise AssertionError("unreachable")
    return loss
step = CUDAGraphStep(model, torch.optim.AdamW(_adapter(model), lr=1e-3, capturable=True), syncing_loss)
try:
    step(torch.randint(0, 256, (2, 16), device="cuda"))
except RuntimeError as err:
    print("RAISED", "host synchronisation" in str(err))
"""


@pytest.mark.gpu
def test_a_host_sync_in_the_loss_is_named_when_capture_fails() -> None:
    """In a child process: a failed capture can leave the CUDA context unusable for later tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _HOST_SYNC_SCRIPT], capture_output=True, text=True, env=env, cwd=root)
    assert "RAISED True" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
