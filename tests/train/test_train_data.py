"""Training data: supervision masks per format, text blocks, validation errors with file:line."""

from __future__ import annotations

import pytest

from helpers import EXAMPLES, write_jsonl
from helpers.train import FakeSpec, chat_rows, reviews
from tunelab.errors import DataError
from tunelab.train.config import TrainDataConfig
from tunelab.train.data import ChatEncoder, eos_supervised, load_train_data, prompt_messages, supervision_preview


def targets_text(example, tok) -> list[str]:
    return [t for t, is_target in supervision_preview(example, tok, max_tokens=10 ** 6) if is_target]


def load(tmp_path, rows, tok, **kw):
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    return load_train_data(TrainDataConfig(path=str(p), **kw), tok)


def test_chat_supervises_only_assistant_answers_and_end_of_turn(tmp_path, tokenizer):
    data = load(tmp_path, chat_rows(3), tokenizer)
    assert data.format == "chat"
    for ex, row in zip(data.examples, reviews(3)):
        assert targets_text(ex, tokenizer) == [row["label"] + "<|im_end|>"]
        assert eos_supervised(ex, tokenizer, "<|im_end|>")
        assert ex.targets[0] is False
    # The trailing newline after <|im_end|> and the prompt are context only.
    s = data.stats.as_dict()
    assert s["examples"] == 3 and s["target_tokens"] == sum(e.n_targets for e in data.examples)


def test_multi_turn_and_weight_zero(tmp_path, tokenizer):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    data = load(tmp_path, [row], tokenizer)
    assert targets_text(data.examples[0], tokenizer) == ["4<|im_end|>", "6<|im_end|>"]


def test_alpaca_and_sharegpt(tmp_path, tokenizer):
    a = load(tmp_path, [{"instruction": "Add", "input": "2 and 3", "output": "5"}], tokenizer)
    assert a.format == "alpaca" and targets_text(a.examples[0], tokenizer) == ["5<|im_end|>"]
    text = tokenizer.decode(a.examples[0].input_ids)
    assert "Add\n\n2 and 3" in text
    s = load(tmp_path, [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello!"}]}], tokenizer)
    assert s.format == "sharegpt" and targets_text(s.examples[0], tokenizer) == ["Hello!<|im_end|>"]


def test_prompt_spec_items_train_the_label_exactly_as_eval_renders_the_prompt(tokenizer):
    spec = FakeSpec()
    item = reviews(1)[0]
    msgs, train = prompt_messages(spec, item, "x.jsonl:1")
    assert msgs[:-1] == spec.render(item) and msgs[-1] == {"role": "assistant", "content": item["label"]}
    ex = ChatEncoder(tokenizer).encode(msgs, train, "x.jsonl:1")
    # The tokens before the answer are exactly what eval scores from: the prompt with the generation prompt.
    prompt_ids = tokenizer(tokenizer.apply_chat_template(spec.render(item), tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    first_target = ex.targets.index(True)
    assert ex.input_ids[:first_target] == prompt_ids
    assert targets_text(ex, tokenizer) == [item["label"] + "<|im_end|>"]
    with pytest.raises(DataError, match="x.jsonl:3: label 'Neutral' is not in the label set"):
        prompt_messages(spec, {"text": "so-so", "label": "Neutral"}, "x.jsonl:3")


def test_real_prompt_spec(tmp_path, tokenizer):
    p = write_jsonl(tmp_path / "r.jsonl", reviews(4))
    data = load_train_data(TrainDataConfig(path=str(p), prompt=str(EXAMPLES / "prompts/sentiment_binary.yaml")),
                           tokenizer)
    assert data.format == "prompt"
    for ex in data.examples:
        assert eos_supervised(ex, tokenizer, "<|im_end|>")
        assert targets_text(ex, tokenizer)[-1].endswith("<|im_end|>")


def test_mixed_in_files_keep_their_own_format_and_prompt(tmp_path, tokenizer):
    three = str(EXAMPLES / "train/sentiment_three_short.yaml")
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(3))
    items = write_jsonl(tmp_path / "items.jsonl", reviews(5))
    data = load_train_data(TrainDataConfig(path=str(chat), mix=[{"path": str(items), "prompt": three, "limit": 4}]),
                           tokenizer)
    alone = load_train_data(TrainDataConfig(path=str(items), prompt=three, limit=4), tokenizer)
    assert data.format == "chat" and data.spec is None   # data.path's format and spec lead (adapter, eval.data)
    assert [(s["format"], s["examples"]) for s in data.sources] == [("chat", 3), ("prompt", 4)]
    assert len(data.examples) == data.stats.examples == 7 and data.stats.tokens == sum(map(len, data.examples))
    assert data.stats.target_tokens == sum(e.n_targets for e in data.examples)
    # the mixed-in items are rendered through their own PromptSpec, token for token as when trained alone
    assert [e.input_ids for e in data.examples[3:]] == [e.input_ids for e in alone.examples]
    assert "Positive, Negative or Neutral" in tokenizer.decode(data.examples[3].input_ids)
    for ex, row in zip(data.examples[3:], reviews(4)):
        assert targets_text(ex, tokenizer) == [row["label"] + "<|im_end|>"]
    assert data.describe() == f"{chat} (chat) + items.jsonl (prompt, 4)"
    # errors in a mixed-in file name that file and line; a chat file cannot join raw-text pretraining
    bad = write_jsonl(tmp_path / "bad.jsonl", [reviews(1)[0], {"text": "그냥 그래", "label": "Maybe"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: label 'Maybe' is not in the label set"):
        load_train_data(TrainDataConfig(path=str(chat), mix=[{"path": str(bad), "prompt": three}]), tokenizer)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: expected a string field 'text'"):
        load_train_data(TrainDataConfig(path=str(text), mix=[{"path": str(chat)}]), tokenizer, method="pretrain")


def test_text_blocks_for_pretraining(tmp_path, tokenizer):
    doc = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    data = load_train_data(TrainDataConfig(path=str(tmp_path / "a.txt"), max_seq_len=64), tokenizer, method="pretrain")
    assert data.format == "text"
    assert all(len(e) <= 64 for e in data.examples) and len(data.examples) > 3
    assert data.examples[-1].input_ids[-1] == tokenizer.eos_token_id
    assert all(e.targets[0] is False and all(e.targets[1:]) for e in data.examples)
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "second doc"}])
    j = load_train_data(TrainDataConfig(path=str(p)), tokenizer, method="pretrain")
    assert j.format == "text" and len(j.examples) == 2


def test_too_long_examples_are_dropped_and_counted(tmp_path, tokenizer):
    rows = chat_rows(4)
    rows[1]["messages"][1]["content"] = "long " * 400
    data = load(tmp_path, rows, tokenizer, max_seq_len=200)
    assert data.stats.dropped_too_long == 1 and len(data.examples) == 3
    with pytest.raises(DataError, match=r"d.jsonl:2: example has \d+ tokens"):
        load(tmp_path, rows, tokenizer, max_seq_len=200, too_long="error")


def test_forgetting_probe_keeps_its_own_length_limit_whatever_the_run_trains_at(tmp_path, tokenizer):
    """Stages of one experiment train at different data.max_seq_len (a pretrain stage at 256, a labelled one at
    512); their forgetting probes must measure the same examples to compare."""
    from types import SimpleNamespace

    from tunelab.train.config import TrainConfig
    from tunelab.train.forgetting import ForgettingProbe

    rows = chat_rows(4)
    rows[1]["messages"][1]["content"] = "long " * 300  # ~300 tokens: over 256, under the probe's 512
    probe = write_jsonl(tmp_path / "probe.jsonl", rows)
    counts = {}
    for run_len in (64, 256, 2048):
        cfg = TrainConfig.model_validate({"data": {"path": str(probe), "max_seq_len": run_len},
                                          "forgetting": {"data": str(probe)}})
        counts[run_len] = len(ForgettingProbe.create(SimpleNamespace(cfg=cfg, tokenizer=tokenizer)).data.examples)
    assert counts == {64: 4, 256: 4, 2048: 4}
    cfg = TrainConfig.model_validate({"data": {"path": str(probe)},
                                      "forgetting": {"data": str(probe), "max_seq_len": 256}})
    assert len(ForgettingProbe.create(SimpleNamespace(cfg=cfg, tokenizer=tokenizer)).data.examples) == 3
    with pytest.raises(ValueError, match="forgetting.max_seq_len"):  # the CLI shows it as one line, exit 2
        TrainConfig.model_validate({"data": {"path": str(probe)}, "forgetting": {"data": str(probe), "max_seq_len": 4}})


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": \n',
     r"d.jsonl:2: malformed JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}\n',
     r"d.jsonl:1: messages\[1\]: role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"d.jsonl:1: no assistant answer"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}\n',
     r"d.jsonl:1: messages\[1\]: content must be a string"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
     r"d.jsonl:2: alpaca record needs a string 'output'"),
    ('{"foo": 1}\n', r"d.jsonl:1: cannot tell the format"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text(line, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_train_data(TrainDataConfig(path=str(p)), tokenizer)
