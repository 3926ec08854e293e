"""train.prompt_loss_weight: the prompt tokens (system prompt, user turn) trained next to the answer, their mean
loss weighted against the answer's; the answer loss stays what it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers.cli import assert_clean_error, ok
from helpers.train import naive_loss, random_examples, run_train
from tunelab.config import validate_as
from tunelab.train.collate import collate
from tunelab.train.config import TrainConfig
from tunelab.train.data import Example
from tunelab.train.attention import use_varlen_attention
from tunelab.train.loss import SupervisedLoss, batch_loss, batch_nll


def every_token(examples: list[Example]) -> list[Example]:
    return [Example(e.input_ids, [False] + [True] * (len(e) - 1)) for e in examples]


@pytest.mark.parametrize("mode", ["varlen", "packed", "padded"])
def test_prompt_targets_add_every_other_token_after_the_answers(tiny_llama, mode):
    model = copy.deepcopy(tiny_llama)
    if mode == "varlen":
        assert use_varlen_attention(model)
    exs = random_examples([5, 17, 9, 30, 3, 12, 2], seed=4)
    kw = {"varlen": {"packing": True, "varlen": True}, "packed": {"packing": True, "pack_len": 32},
          "padded": {"packing": False}}[mode]
    plain = collate(exs, **kw)
    both = collate(exs, prompt_targets=True, **kw)
    n_answer = sum(e.n_targets for e in exs)
    assert plain.n_targets == both.n_targets == both.n_answer == n_answer
    assert both.targets.numel() == sum(len(e) - 1 for e in exs) == n_answer + sum(e.n_prompt_targets for e in exs)
    assert both.targets[:n_answer].equal(plain.targets)                      # the answers first, unchanged
    lm = SupervisedLoss(model)
    with torch.no_grad():
        nll = batch_nll(lm, both)
        assert float(batch_loss(lm, both)) == pytest.approx(float(naive_loss(model, exs)), rel=1e-5)
        assert float(nll.sum()) == pytest.approx(float(naive_loss(model, every_token(exs))), rel=1e-5)
        assert float(nll[n_answer:].sum()) == pytest.approx(
            float(naive_loss(model, every_token(exs)) - naive_loss(model, exs)), rel=1e-5)


def test_pretrain_refuses_a_prompt_loss_weight():
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="prompt_loss_weight is for SFT"):
        validate_as(TrainConfig, {"method": "pretrain", "data": {"path": "x.txt"},
                                  "train": {"prompt_loss_weight": 0.1}}, "<test>")


def args(tiny, data, out, *extra: str) -> list[str]:
    return ["--model", str(tiny), "--data", str(data), "--out", str(out), "--lr", "5e-3", "--lora-r", "4",
            "--set", "train.dtype=float32", *extra]


def test_prompt_loss_through_the_cli_matches_plain_forwards_and_changes_training(tmp_path, tiny_model_dir,
                                                                              chat_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one step over all 48 examples: its losses are the untrained (LoRA B = 0) base model's
    out = tmp_path / "pl"
    p = ok(run_train(*args(tiny_model_dir, chat_file, out, "--max-steps", "1", "--batch-size", "48",
                           "--micro-batch-size", "8", "--prompt-loss-weight", "0.5")))
    assert "prompt loss: the other" in p.stderr                       # said in the preview
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    stats = json.loads((out / "report.json").read_text())["data"]
    n_answer = stats["target_tokens"]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32).eval()
    total, n_all = 0.0, 0
    with torch.no_grad():
        for line in chat_file.read_text().splitlines():
            text = tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            n_all += ids.shape[1] - 1
    n_prompt = n_all - n_answer
    assert row["loss"] * n_answer + row["prompt_loss"] * n_prompt == pytest.approx(total, rel=1e-4)
    assert row["loss"] > 0 and row["prompt_loss"] > 0

    # the weight reaches the gradient: the same two steps with and without it train different adapters
    from safetensors.torch import load_file

    adapters = {}
    for w in ("0", "1.0"):
        o = tmp_path / f"w{w}"
        p = ok(run_train(*args(tiny_model_dir, chat_file, o, "--max-steps", "2", "--batch-size", "8",
                               "--micro-batch-size", "4", "--set", f"train.prompt_loss_weight={w}")))
        rows = [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
        assert all(("prompt_loss" in r) == (w != "0") for r in rows)
        adapters[w] = load_file(str(o / "adapter" / "adapter_model.safetensors"))
    assert rows[0]["loss"] == pytest.approx(json.loads((tmp_path / "w0" / "metrics.jsonl").read_text()
                                                       .splitlines()[0])["loss"], rel=1e-5)  # same answer loss
    diff = max((adapters["0"][k] - adapters["1.0"][k]).abs().max().item() for k in adapters["0"])
    assert diff > 1e-4


@pytest.mark.parametrize("extra, message", [
    (["--method", "pretrain", "--prompt-loss-weight", "0.1"], "prompt_loss_weight is for SFT"),
    (["--set", "train.prompt_loss_weight=-1"], "train.prompt_loss_weight"),
])
def test_bad_prompt_loss_weight_is_one_line_exit_2(tmp_path, tiny_model_dir, chat_file, extra, message):
    assert_clean_error(run_train("--model", str(tiny_model_dir), "--data", str(chat_file), "--out",
                                 str(tmp_path / "x"), *extra), message)
    assert not (tmp_path / "x").exists()
