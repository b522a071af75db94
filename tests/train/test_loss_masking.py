"""The loss counts completion tokens only: prompt and padding positions add nothing to loss or gradients.

Reference: transformers' own causal-LM loss (labels shifted by one, -100 ignored) on the same weights.
"""

from __future__ import annotations

import torch

from minilora.train.data import IGNORE_INDEX, Record, collate, tokenize_records
from minilora.train.loop import causal_lm_loss


def _lora_model(tiny_dir):
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora

    model = from_pretrained(tiny_dir)
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_equals_transformers_masked_loss(tiny_dir, byte_tok):
    from transformers import LlamaForCausalLM

    exs = tokenize_records([Record("How much? $", "12.00"), Record("A much longer prompt: $", "7.00")], byte_tok)
    batch = collate(exs.examples, pad_token_id=258)
    ours = _lora_model(tiny_dir).eval()
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        loss_sum, n = causal_lm_loss(ours, batch)
        from minilora.lora import merge_and_unload

        merged = merge_and_unload(ours)
        hf.load_state_dict({k: v for k, v in merged.state_dict().items()}, strict=False)
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert n == sum(e.n_target_tokens for e in exs.examples) == len("12.00") + len("7.00") + 2
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)
    # the mask matters: learning the prompt too gives another number
    with torch.no_grad():
        unmasked = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids).loss
    assert abs(unmasked.item() - ref.item()) > 1e-3


def test_prompt_positions_contribute_nothing_to_loss_or_gradients(tiny_dir, byte_tok):
    model = _lora_model(tiny_dir)
    ex = tokenize_records([Record("Title: Kettle\nPrice is $", "30.00")], byte_tok).examples[0]
    batch = collate([ex])
    n_prompt = ex.labels.count(IGNORE_INDEX)

    loss_sum, n = causal_lm_loss(model, batch)
    (loss_sum / n).backward()
    ours, grads = (loss_sum / n).detach(), _grads(model)
    model.zero_grad()

    # manual: full logits; the logits at prompt positions are wrecked with noise, which must change nothing
    logits = model(batch.input_ids)  # (1, T, V)
    noise = torch.zeros_like(logits)
    noise[:, : n_prompt - 1] = 100 * torch.randn_like(noise[:, : n_prompt - 1])  # positions predicting prompt tokens
    logits = logits + noise
    targets = batch.input_ids[0, n_prompt:]  # completion tokens, predicted from position t - 1
    logprobs = logits[0, n_prompt - 1 : -1].log_softmax(-1)
    manual = -logprobs.gather(-1, targets[:, None]).mean()
    manual.backward()
    torch.testing.assert_close(ours, manual.detach(), rtol=1e-5, atol=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    # and the prompt's labels really are ignored: putting them back changes the loss
    batch.labels[0, 1:n_prompt] = batch.input_ids[0, 1:n_prompt]
    with torch.no_grad():
        relabelled, n2 = causal_lm_loss(model, batch)
    assert n2 == n + n_prompt - 1 and abs(relabelled.item() / n2 - ours.item()) > 1e-3


def test_padding_changes_nothing(tiny_dir, byte_tok):
    model = _lora_model(tiny_dir).eval()
    exs = tokenize_records([Record("Q: $", "5.00"), Record("A longer question: $", "15.00")], byte_tok).examples
    with torch.no_grad():
        together, n = causal_lm_loss(model, collate(exs, pad_token_id=258))
        alone = [causal_lm_loss(model, collate([e])) for e in exs]
    assert n == sum(k for _, k in alone)
    torch.testing.assert_close(together, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)
