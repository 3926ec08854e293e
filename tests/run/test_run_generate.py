"""The generate stage inside `tunelab run`: a teacher (the fake OpenAI-compatible server on 127.0.0.1) labels the
training reviews, LoRA trains on the teacher's labels, and the teacher's tokens and spend reach the cost table."""

from __future__ import annotations

import json
import shutil

from helpers import read_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok, run_cli
from helpers.fakeserver import FakeServer
from helpers.run import FEW_SHOT, TRAIN, actions, experiment, run_env, state


def test_teacher_labels_feed_training_and_the_cost(tiny_model_dir, tmp_path):
    with FakeServer(labels=["Positive", "Negative"]) as srv:
        gen = {"config": {
            "name": "teacher", "pipeline": "label", "prompt": str(FEW_SHOT),
            "data": {"path": str(TRAIN), "limit": 16},
            "teacher": {"model": "fake-label", "base_url": srv.url, "api_key_env": "FAKE_TEACHER_KEY",
                        "price": {"input": 0.15, "output": 0.6}, "concurrency": 4, "timeout_s": 10,
                        "max_retries": 2, "backoff_initial_s": 0.01},
            "sampling": {"max_tokens": 8}, "quality": {"dedup": "exact"}},
            "exclude_gold": False}  # the teacher relabels the gold reviews on purpose (as inputs: train would)
        exp = experiment(tiny_model_dir, generate=gen)
        exp["train"][0]["data"] = "generated"
        path = write_yaml(tmp_path / "exp.yaml", exp)
        out = tmp_path / "out"
        env = run_env(tmp_path, FAKE_TEACHER_KEY="sk-test-not-a-real-key")
        p = ok(run_cli("run", path, "--out", out, env=env))
        assert actions(out) == {"eval": ("done", "ran"), "generate": ("done", "ran"), "train/lora": ("done", "ran"),
                                "eval_after": ("done", "ran")}
        sent = srv.stats()["completions"]
        assert sent >= 16

        data = out / "generate" / "data.jsonl"
        rows = read_jsonl(data)
        assert len(rows) == 16 and all(r["label"] in ("Positive", "Negative") and "gold_label" in r for r in rows)
        assert json.loads((out / "train" / "lora" / "report.json").read_text())["data"]["path"] == str(data.resolve())
        resolved = (out / "configs" / "generate.yaml").read_text()
        assert srv.url in resolved and "sk-test" not in resolved  # the key is never written

        s = json.loads((out / "summary.json").read_text())
        gen_cost = next(c for c in s["cost"]["stages"] if c["stage"] == "generate")
        assert gen_cost["teacher_usd"] > 0 and gen_cost["tokens"] > 0
        assert s["cost"]["teacher_usd"] == gen_cost["teacher_usd"]
        assert "teacher $" in p.stdout
        html = (out / "report.html").read_text()
        assert f"${gen_cost['teacher_usd']:.4f}" in html

        # a rerun asks the teacher nothing and trains nothing
        ok(run_cli("run", path, "--out", out, env=env))
        assert set(actions(out).values()) == {("done", "cached")}
        assert srv.stats()["completions"] == sent
        # nor does one whose input files moved (a checkout elsewhere): the same bytes are the same stage
        moved = tmp_path / "moved"
        moved.mkdir()
        gen["config"]["prompt"] = str(shutil.copy(FEW_SHOT, moved / "teacher_prompt.yaml"))
        gen["config"]["data"]["path"] = str(shutil.copy(TRAIN, moved / "reviews.jsonl"))
        ok(run_cli("run", write_yaml(tmp_path / "moved.yaml", exp), "--out", out, env=env))
        assert set(actions(out).values()) == {("done", "cached")}
        assert srv.stats()["completions"] == sent
    assert state(out)["stages"]["train/lora"]["result"]["data"] == str(data.resolve())


def test_a_student_of_a_teacher_that_kept_nothing_is_one_line(tiny_model_dir, tmp_path):
    """A teacher whose every label falls under quality.min_confidence (here: a server without logprobs) leaves the
    student nothing from it: the train stage says so, and why, instead of 'the dataset has no records'."""
    with FakeServer(labels=["Positive", "Negative"]) as srv:
        gen = {"config": {
            "name": "teacher", "pipeline": "label", "prompt": str(FEW_SHOT), "data": {"path": str(TRAIN), "limit": 8},
            "teacher": {"model": "fake-label", "base_url": srv.url, "concurrency": 4, "timeout_s": 10},
            "sampling": {"max_tokens": 8}, "quality": {"dedup": "exact", "min_confidence": 0.9}},
            "exclude_gold": False}
        exp = experiment(tiny_model_dir, generate=gen)
        exp["train"][0]["mix"] = ["generated"]
        out = tmp_path / "out"
        p = run_cli("run", write_yaml(tmp_path / "exp.yaml", exp), "--out", out,
                    env=run_env(tmp_path, OPENAI_API_KEY="sk-test-not-a-real-key"))
    line = assert_clean_error(p, "the generate stage kept none", "no_confidence 8", "min_confidence",
                              last_line_only=True)
    assert "has no records" not in line
    done = actions(out)
    assert done["generate"][0] == "done" and done["train/lora"][0] != "done"
