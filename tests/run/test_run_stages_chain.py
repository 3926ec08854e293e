"""A language-adaptation experiment as one `tunelab run` (the tiny model, a few steps each): a vocab: stage extends
the model, a pretrain method trains only the new rows on unlabelled text from it (model: vocab), a LoRA method
trains on labels from that (model: NAME), another LoRA trains on the extended model directly and then labels
unlabelled text as the teacher behind `tunelab serve` (generate.serve: METHOD), and a student trains on gold + the
kept teacher labels (mix: [generated]); eval_after scores the LoRA methods on their own bases and not the pretrain
stage; the chain is cached stage by stage (a change to the pretrain stage redoes it and what starts from it,
nothing else); bad chains are one line."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import EXAMPLES, read_jsonl, write_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok, run_cli
from helpers.run import DEV, SHORT, actions, experiment, run_env, state
from helpers.train import reviews

LORA = {"method": "lora", "prompt": "short", "max_seq_len": 512, "lora": {"r": 4, "alpha": 8,
        "modules_to_save": ["embed_tokens"]}, "optim": {"lr": 5.0e-3}, "train": {"epochs": 1, "batch_size": 4,
        "micro_batch_size": 4}}


def unlabelled(n: int) -> list[dict]:
    """``n`` reviews that are neither the experiment's gold (data.train) nor its eval items: unlabelled text."""
    taken = {r["text"] for r in reviews(10_000)} | {r["text"] for r in read_jsonl(DEV)}
    return [r for r in read_jsonl(EXAMPLES / "data" / "nsmc_binary_train_4000.jsonl") if r["text"] not in taken][:n]


def teacher_config(texts):
    cfg = yaml.safe_load((EXAMPLES / "generate" / "nsmc_teacher_label.yaml").read_text(encoding="utf-8"))
    cfg.update(prompt=str(SHORT), data={"path": str(texts)}, budget={"max_requests": 100})
    cfg.pop("contamination")
    cfg["sampling"]["max_tokens"] = 1  # each label is one token; the tiny teacher never learns to stop
    cfg["quality"]["allow_truncated"] = True
    cfg["teacher"].update(model="x", api_key_env="NO_SUCH_KEY_NEEDED")
    return cfg


def chain(model, texts, **over):
    rows = {"name": "rows", "method": "pretrain", "model": "vocab", "data": str(texts), "limit": 32,
            "max_seq_len": 64, "trainable": {"match": ["embed_tokens"], "new_rows_only": True},
            "optim": {"lr": 1.0e-2}, "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8}}
    rows.update(over.pop("rows", {}))
    return experiment(model, vocab={"data": str(texts), "add": 100}, train=[
        # the teacher: long enough on 16 reviews to answer with a label (a random tiny model babbles)
        {"name": "vocab_only", "model": "vocab", **LORA, "optim": {"lr": 2.0e-2},
         "train": {"max_steps": 40, "batch_size": 4, "micro_batch_size": 4}},
        rows,
        {"name": "rows_then_labels", "model": "rows", **LORA},
        {"name": "student", "model": "vocab", "data": "gold", "mix": ["generated"], **LORA}],
        generate={"config": teacher_config(texts), "serve": "vocab_only", "limit": 12},
        eval_after={"compare": [["vocab_only", "rows_then_labels"]]}, serve={"mode": "command"}, **over)


@pytest.fixture(scope="module")
def chained(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    texts = write_jsonl(d / "texts.jsonl", [{"text": r["text"]} for r in unlabelled(200)])
    exp = write_yaml(d / "exp.yaml", chain(tiny_model_dir, texts))
    out = d / "out"
    p = ok(run_cli("run", exp, "--out", out, env=run_env(d)))
    return exp, out, p, d, texts


def test_the_chain_runs_each_stage_from_the_one_before(chained, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    exp, out, p, d, _ = chained
    assert actions(out) == {k: ("done", "ran") for k in (
        "eval", "vocab", "train/vocab_only", "generate", "train/rows", "train/rows_then_labels", "train/student",
        "eval_after", "serve")}
    assert list(state(out)["stages"])[:4] == ["eval", "vocab", "train/vocab_only", "generate"]
    st = state(out)["stages"]
    vocab = out / "vocab" / "model"
    assert st["vocab"]["result"]["model"] == str(vocab)
    assert st["vocab"]["result"]["tokens_per_text_after"] < st["vocab"]["result"]["tokens_per_text_before"]
    rows_model = out / "train" / "rows" / "model"
    assert st["train/vocab_only"]["result"]["base_model"] == str(vocab)
    assert st["train/rows"]["result"]["base_model"] == str(vocab)
    assert st["train/rows_then_labels"]["result"]["base_model"] == str(rows_model)
    first = json.loads((vocab / "tunelab_vocab.json").read_text())["first_new_id"]
    before, after = load_file(str(vocab / "model.safetensors")), load_file(str(rows_model / "model.safetensors"))
    emb = "model.embed_tokens.weight"
    assert torch.equal(after[emb][:first], before[emb][:first]) and not torch.equal(after[emb], before[emb])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != emb)
    # eval_after: the two LoRA methods on their own bases; the pretrain stage is not scored
    summary = json.loads((out / "eval_after" / "summary.json").read_text())
    assert sorted(summary["methods"]) == ["rows_then_labels", "student", "vocab_only"]
    assert [(x["baseline"], x["model"]) for x in summary["pairs"]] == [("vocab_only", "rows_then_labels")]
    rows = [json.loads(x) for x in (out / "eval_after" / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} >= {"vocab_only", "rows_then_labels"}
    cmds = (out / "serve" / "command.txt").read_text()
    assert f"tunelab serve --model {vocab} --adapter vocab_only=" in cmds
    assert f"tunelab serve --model {rows_model} --adapter rows_then_labels=" in cmds
    assert "vocab " in p.stdout and "tokens added" in p.stdout
    # the teacher: vocab_only's adapter on the extended model, behind tunelab serve; the student: gold + its labels
    labelled = read_jsonl(out / "generate" / "data.jsonl")
    assert len(labelled) == st["generate"]["result"]["kept"] and 0 < len(labelled) <= 12
    assert all(r["label"] in ("Positive", "Negative") for r in labelled)
    assert "serving vocab_only" in (out / "logs" / "generate.log").read_text()
    student = yaml.safe_load((out / "configs" / "train_student.yaml").read_text())
    assert student["data"]["mix"] == [{"path": str(out / "generate" / "data.jsonl"), "format": "prompt",
                                       "prompt": student["data"]["prompt"], "limit": None, "text_field": "text",
                                       "encoding": None}]
    rep = json.loads((out / "train" / "student" / "report.json").read_text())
    assert rep["data"]["examples"] == 16 + len(labelled)  # train_limit 16 gold + every kept teacher label


def test_a_change_to_the_pretrain_stage_redoes_it_and_what_starts_from_it(chained, tmp_path):
    import shutil

    exp, out, _, d, texts = chained
    out2 = shutil.copytree(out, tmp_path / "out")
    exp2 = write_yaml(tmp_path / "exp.yaml", chain(_model_of(exp), texts, rows={"optim": {"lr": 2e-2}}))
    ok(run_cli("run", exp2, "--out", out2, env=run_env(d)))
    acts = actions(out2)
    assert {k: a for k, (_, a) in acts.items()} == {
        "eval": "cached", "vocab": "cached", "train/vocab_only": "cached", "generate": "cached", "train/rows": "ran",
        "train/rows_then_labels": "ran", "train/student": "cached", "eval_after": "ran", "serve": "ran"}


def _model_of(exp):
    import yaml

    return yaml.safe_load(exp.read_text())["model"]


@pytest.mark.parametrize("case, needles", [
    ("vocab_without_stage", ["train.0.model", "'vocab' needs a vocab: stage"]),
    ("unknown_start", ["train.1.model", "'nope' is neither base, vocab nor an earlier train method"]),
    ("from_lora", ["train.1.model", "is a LoRA method"]),
    ("compare_pretrain", ["eval_after.compare.0", "'rows' is not scored"]),
    ("missing_vocab_data", ["vocab.data", "no such file"]),
])
def test_bad_chains_are_one_line(tiny_model_dir, tmp_path, case, needles):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["text"]} for r in reviews(8)])
    exp = chain(tiny_model_dir, texts)
    if case == "vocab_without_stage":
        exp.pop("vocab")
    elif case == "unknown_start":
        exp["train"][1]["model"] = "nope"
    elif case == "from_lora":
        exp["train"][1] = {"name": "second", "model": "vocab_only", **LORA}
        exp["train"] = exp["train"][:2]
        exp["eval_after"] = {}
    elif case == "compare_pretrain":
        exp["eval_after"] = {"compare": [["vocab_only", "rows"]]}
    else:
        exp["vocab"]["data"] = str(tmp_path / "missing.jsonl")
    f = write_yaml(tmp_path / "exp.yaml", exp)
    line = assert_clean_error(run_cli("run", f, "--out", tmp_path / "out", env=run_env(tmp_path)), *needles)
    assert "exp.yaml:" in line
    assert not (tmp_path / "out" / "run.json").exists()
