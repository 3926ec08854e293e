"""Staged training of a grown vocabulary (the ``trainable:`` section, tunelab/train/freeze.py): a first stage that
trains only the new rows of the input embedding and output layer (tied and untied) leaves every old row and every
other weight bit-identical and moves the new rows; LoRA with the embeddings in modules_to_save holds the old rows the
same way; the stage's model stays an extended one (tunelab_vocab.json travels with it); bad settings are one line."""

from __future__ import annotations

import json

import pytest

from helpers import EXAMPLES, write_jsonl
from helpers.cli import assert_clean_error, ok
from helpers.train import common, reviews, run_train
from helpers.vocab import extend

PROMPT = EXAMPLES / "train" / "sentiment_binary_short.yaml"


def stage_config(tmp_path, model, data, *, method="pretrain", trainable=None, extra="", prompt=None):
    """A 3-step training config (``extra``: more YAML lines; an ``optim:`` line there replaces the default one)."""
    cfg = tmp_path / "stage.yaml"
    optim = "" if extra.startswith("optim:") else "optim: {lr: 0.05, warmup_steps: 0}\n"
    cfg.write_text(f"method: {method}\nmodel: {model}\nout: {tmp_path / 'run'}\n"
                   f"data: {{path: {data}, max_seq_len: 64" + (f", prompt: {prompt}" if prompt else "") + "}\n"
                   + optim
                   + "train: {max_steps: 3, batch_size: 8, micro_batch_size: 4, dtype: float32}\n"
                   + (f"trainable: {json.dumps(trainable)}\n" if trainable is not None else "") + extra,
                   encoding="utf-8")
    return cfg


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def first_id(model):
    return json.loads((model / "tunelab_vocab.json").read_text())["first_new_id"]


def assert_only_new_rows_moved(before, after, first, rows=("model.embed_tokens.weight",)):
    import torch

    for name, w in before.items():
        if name not in after:  # a tied output layer is saved once
            continue
        if name in rows:
            assert torch.equal(after[name][:first], w[:first]), f"{name}: an old row moved"
            moved = (after[name][first:] != w[first:]).any(dim=1)
            assert moved.sum() >= 20, f"{name}: only {int(moved.sum())} new rows moved"  # input rows: tokens seen
        else:
            assert torch.equal(after[name], w), f"{name} moved but is frozen"


def test_the_first_stage_trains_only_the_new_rows(tmp_path, extended, texts):
    ok(run_train(str(stage_config(tmp_path, extended, texts,
                                  trainable={"match": ["embed_tokens"], "new_rows_only": True}))))
    out = tmp_path / "run" / "model"
    assert_only_new_rows_moved(weights(extended), weights(out), first_id(extended))
    assert json.loads((out / "tunelab_vocab.json").read_text()) == \
        json.loads((extended / "tunelab_vocab.json").read_text())  # a later stage can hold the rows again
    log = json.loads((tmp_path / "run" / "report.json").read_text())
    assert log["parameters"]["trainable"] == weights(extended)["model.embed_tokens.weight"].numel()


def test_untied_output_layer_rows_are_held_too(tmp_path, untied, texts):
    _, ext = untied
    ok(run_train(str(stage_config(tmp_path, ext, texts,
                                  trainable={"match": ["embed_tokens", "lm_head"], "new_rows_only": True}))))
    assert_only_new_rows_moved(weights(ext), weights(tmp_path / "run" / "model"), first_id(ext),
                               rows=("model.embed_tokens.weight", "lm_head.weight"))


def test_without_new_rows_only_the_matched_weights_all_train(tmp_path, extended, texts):
    import torch

    ok(run_train(str(stage_config(tmp_path, extended, texts, trainable={"match": ["embed_tokens"]}))))
    before, after = weights(extended), weights(tmp_path / "run" / "model")
    first = first_id(extended)
    assert not torch.equal(after["model.embed_tokens.weight"][:first], before["model.embed_tokens.weight"][:first])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_lora_with_the_embeddings_holds_their_old_rows(tmp_path, extended):
    import torch
    from safetensors.torch import load_file

    items = write_jsonl(tmp_path / "items.jsonl", reviews(16))
    ok(run_train(*common(extended, items, tmp_path / "run", "--max-steps", "3", "--prompt", str(PROMPT),
                         "--set", "lora.modules_to_save=[embed_tokens]", "--set", "trainable.new_rows_only=true",
                         "--set", "train.dtype=float32")))
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    emb = next(v for k, v in saved.items() if "embed_tokens" in k)
    base = weights(extended)["model.embed_tokens.weight"]
    first = first_id(extended)
    assert torch.equal(emb[:first], base[:first])
    assert (emb[first:] != base[first:]).any(dim=1).sum() >= 20  # the new tokens of 16 reviews (input rows only)


@pytest.mark.parametrize("case, needles", [
    ("not_extended", ["new_rows_only needs a model whose vocabulary", "tunelab_vocab.json is missing"]),
    ("no_match", ["trainable.match", "names no parameter"]),
    ("lora_match", ["trainable.match is for methods full and pretrain"]),
    ("decay", ["set optim.weight_decay", "to 0"]),
    ("bad_regex", ["is not a regular expression"]),
])
def test_bad_settings_are_one_line(tmp_path, tiny_model_dir, extended, texts, case, needles):
    model, trainable, method = extended, {"match": ["embed_tokens"], "new_rows_only": True}, "pretrain"
    extra = ""
    if case == "not_extended":
        model = tiny_model_dir
    elif case == "no_match":
        trainable = {"match": ["no_such_weight"], "new_rows_only": False}
    elif case == "lora_match":
        method, extra = "lora", f"lora: {{r: 4}}\n"
    elif case == "decay":
        extra = "optim: {lr: 0.05, weight_decay: 0.01}\n"
    else:
        trainable = {"match": ["embed_tokens("]}
    cfg = stage_config(tmp_path, model, texts, method=method, trainable=trainable, extra=extra,
                       prompt=PROMPT if method == "lora" else None)
    assert_clean_error(run_train(str(cfg)), *needles, last_line_only=True)
    assert not (tmp_path / "run" / "model").exists()
