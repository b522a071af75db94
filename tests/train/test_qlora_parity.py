"""A 20-step minilora QLoRA run follows transformers + bitsandbytes + peft step for step.

Same tiny checkpoint, NF4 + double quant base (float32 compute), LoRA r=8 alpha=16 on q/k/v/o with the
same A/B init (copied from minilora's adapter into peft's), same AdamW, same schedule, same clipping,
same batches (minilora's DataOrder). The reference model stays in train mode (dropout 0): bitsandbytes'
CPU eval-mode 4-bit forward would compute in bf16 on an AVX512-BF16 processor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minilora.train.data import IGNORE_INDEX, DataOrder, tokenize_records
from minilora.train.loop import TrainConfig, seed_everything, train, warmup_cosine

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
STEPS = 20


def test_minilora_qlora_matches_transformers_bitsandbytes_peft(
    hf_tiny_llama_dir: Path, byte_tok, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from minilora.loading import from_pretrained
    from minilora.lora import adapter_state_dict, add_lora
    from minilora_demo.price import split_products

    train_p, _, _ = split_products(24, 0, 0, seed=2)
    examples = tokenize_records([p.record() for p in train_p], byte_tok, max_length=96).examples
    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=STEPS,
        batch_size=4,
        lr=3e-3,
        weight_decay=0.01,
        warmup_steps=3,
        max_grad_norm=1.0,
        seed=5,
        progress=False,
        plot=False,
    )

    # minilora
    ours = from_pretrained(hf_tiny_llama_dir, quantize="nf4", double_quant=True)
    seed_everything(0)
    add_lora(ours, r=8, alpha=16, target_modules=ATTN)
    with torch.no_grad():  # a non-zero B so that step 1 already exercises both matrices
        for key, t in adapter_state_dict(ours).items():
            if "lora_B" in key:
                t.normal_(0, 0.02)
    init = {k: v.detach().clone() for k, v in adapter_state_dict(ours).items()}
    result = train(ours, examples, cfg, pad_token_id=258)

    # transformers + bitsandbytes + peft, from the same init, on the same batches
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    ref = LlamaForCausalLM.from_pretrained(
        hf_tiny_llama_dir, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )
    ref = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ATTN))
    named = dict(ref.named_parameters())
    with torch.no_grad():
        for key, value in init.items():
            peft_key = key.replace("lora_A.weight", "lora_A.default.weight").replace(
                "lora_B.weight", "lora_B.default.weight"
            )
            named[peft_key].copy_(value)
    params = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(v.numel() for v in init.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup_steps, STEPS))
    order = DataOrder(examples, cfg.batch_size, seed=cfg.seed, pad_token_id=258)
    ref.train()
    ref_losses = []
    for _ in range(STEPS):
        batch = order.next_batch()
        assert (batch.labels != IGNORE_INDEX).any()
        out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref_losses.append(out.loss.item())

    assert len(result.losses) == STEPS
    assert result.losses[-1] < result.losses[0] - 0.1  # it learned something
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
