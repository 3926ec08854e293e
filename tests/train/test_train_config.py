"""TrainConfig: example configs validate, flags override fields, paths resolve, errors name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import EXAMPLES
from tunelab.errors import ConfigError
from tunelab.train.config import TrainConfig, load_train_config


TRAIN_CONFIGS = sorted(p for p in (EXAMPLES / "train").glob("*.yaml") if "\nmethod:" in p.read_text())


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_train_config(path)
    assert Path(cfg.data.path).is_absolute() and Path(cfg.data.path).exists()
    assert cfg.data.prompt is None or Path(cfg.data.prompt).is_absolute()
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#")  # each config says what it is for and how to run it


def test_training_prompt_spec_loads():
    from tunelab.prompts import load_prompt_spec

    spec = load_prompt_spec(EXAMPLES / "train" / "sentiment_binary_short.yaml")
    assert spec.labels == ["Positive", "Negative"]
    msgs = spec.render({"text": "좋아요"})
    assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "좋아요"


def test_flags_override_fields_and_paths_resolve(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "t.yaml").write_text(
        "method: lora\ndata: {path: d.jsonl, limit: 10, mix: [{path: ../m/e.jsonl, prompt: p.yaml}]}\n"
        "optim: {lr: 0.001}\nout: runs/x\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(tmp_path / "cfg" / "t.yaml", {"optim.lr": 5e-4, "train.epochs": 3, "data.limit": None})
    assert cfg.optim.lr == 5e-4 and cfg.train.epochs == 3 and cfg.data.limit == 10
    assert cfg.data.path == str(tmp_path / "cfg" / "d.jsonl")     # relative to the config file
    assert cfg.out == "runs/x"                                     # outputs: relative to where it runs
    assert cfg.data.mix[0].path == str(tmp_path / "m" / "e.jsonl") and cfg.data.mix[0].prompt == str(
        tmp_path / "cfg" / "p.yaml")                               # mixed-in files too
    quick = load_train_config(None, {"data.path": "other.jsonl", "data.prompt": "p.yaml", "out": "o"})
    assert quick.data.path == str(tmp_path / "other.jsonl") and quick.data.format == "auto"
    assert quick.out == str(tmp_path / "o") and quick.model is None


@pytest.mark.parametrize("text,message", [
    ("data: {path: d.jsonl}\nlora: {rank: 8}\n", "lora.rank: unknown field"),
    ("data: {path: d.jsonl}\ntrain: {batch_size: 10, micro_batch_size: 4}\n", "must be a multiple"),
    ("data: {path: d.jsonl}\nmethod: sft\n", "method: Input should be 'lora', 'full' or 'pretrain'"),
    ("data: {path: d.jsonl, format: prompt}\n", "data: format 'prompt' needs prompt: a PromptSpec YAML"),
    ("data: {path: d.jsonl, mix: [{path: e.jsonl, format: prompt}]}\n", "data.mix.0: format 'prompt' needs prompt"),
    ("data: {path: d.jsonl, mix: [{path: e.jsonl, colour: red}]}\n", "data.mix.0.colour: unknown field"),
    ("data: {path: d.jsonl}\neval: {data: dev.jsonl}\n", "eval.data scores held-out items"),
    ("data: {path: d.jsonl}\ntrain: {ema_decay: 1.5}\n", "train.ema_decay: Input should be less than 1"),
    ("method: lora\n", "data: required field is missing"),
    ("data: [1, 2\n", "invalid YAML"),
])
def test_config_errors_name_file_and_field(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_train_config(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_lora_target_modules_forms():
    base = {"data": {"path": "x"}}
    assert TrainConfig.model_validate({**base, "lora": {"target_modules": "q_proj"}}).lora.target_modules == ["q_proj"]
    assert TrainConfig.model_validate(base).lora.target_modules == "all-linear"
