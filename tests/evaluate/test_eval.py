"""`tunelab eval` end to end on the bundled model with a handful of items (the real CLI in a subprocess)."""

import json

import pytest

from helpers import EXAMPLES, read_jsonl
from helpers.cli import ok, run_cli

pytestmark = pytest.mark.model


@pytest.fixture()
def call_cache(tmp_path):
    return {"TUNELAB_CALL_CACHE": str(tmp_path / "calls.sqlite")}


def test_quick_form_label_task_and_cache(tmp_path, call_cache):
    out = tmp_path / "out"
    args = ["eval", "--prompt", str(EXAMPLES / "prompts/sentiment_fewshot.yaml"),
            "--prompt", str(EXAMPLES / "prompts/sentiment_zeroshot.yaml"),
            "--data", str(EXAMPLES / "data/nsmc_three_dev_300.jsonl"), "--limit", "8", "--out", str(out)]
    r = ok(run_cli(*args, env=call_cache))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_items"] == 8 and summary["task"] == "label"
    assert [c["variant"] for c in summary["cells"]] == ["sentiment_fewshot", "sentiment_zeroshot"]
    for c in summary["cells"]:
        acc = c["metrics"]["accuracy"]
        assert 0 <= acc["low"] <= acc["value"] <= acc["high"] <= 1
        assert c["mode"] == "loglik"
        assert len(c["confusion"]["matrix"]) == 3
    assert sum(1 for c in summary["cells"] if c["comparison"] and c["comparison"]["vs"] is None) == 1
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 16
    for row in rows:
        for key in ("input", "prompt_hash", "raw_output", "prediction", "correct", "cached", "gold"):
            assert key in row
        assert row["prediction"] in ("Positive", "Negative", "Neutral")
        assert row["correct"] == (row["prediction"] == row["gold"])
        assert row["cached"] is False
    assert (out / "report.html").read_text().count("sentiment_fewshot") >= 1
    assert "accuracy" in r.stdout

    # The same run again comes from the cache, with identical predictions.
    ok(run_cli(*args, env=call_cache))
    rows2 = read_jsonl(out / "results.jsonl")
    assert all(row["cached"] for row in rows2)
    assert [x["prediction"] for x in rows2] == [x["prediction"] for x in rows]


def test_generation_task_with_cot_and_samples(tmp_path, call_cache):
    out = tmp_path / "out"
    r = ok(run_cli("eval", "--prompt", str(EXAMPLES / "prompts/apples_cot.yaml"),
                   "--data", str(EXAMPLES / "data/gsm8k_dev_50.jsonl"), "--limit", "2", "--max-new-tokens", "24",
                   "--samples", "2", "--temperature", "0.8", "--out", str(out), env=call_cache))
    summary = json.loads((out / "summary.json").read_text())
    cell = summary["cells"][0]
    assert cell["mode"] == "generate" and summary["task"] == "number"
    assert cell["n_samples"] == 2 and set(cell["pass_rate"]) == {"gsm8k-dev-0", "gsm8k-dev-1"}
    rows = read_jsonl(out / "results.jsonl")
    assert sorted((r["item_id"], r["sample"]) for r in rows) == [
        ("gsm8k-dev-0", 0), ("gsm8k-dev-0", 1), ("gsm8k-dev-1", 0), ("gsm8k-dev-1", 1)]
    for row in rows:
        assert row["raw_output"] is not None and row["completion_tokens"] <= 24
        assert row["correct"] in (True, False)
    # the samples are samples (temperature 0.8), not one answer twice
    outputs = {item: {r["raw_output"] for r in rows if r["item_id"] == item} for item in cell["pass_rate"]}
    assert any(len(texts) == 2 for texts in outputs.values()), outputs


def test_dry_run_runs_nothing(tmp_path, call_cache):
    out = tmp_path / "out"
    r = ok(run_cli("eval", str(EXAMPLES / "eval_nsmc.yaml"), "--limit", "5", "--dry-run", "--out", str(out),
                   env=call_cache))
    assert "dry run" in r.stdout and "eight_shot" in r.stdout
    assert not (out / "results.jsonl").exists()


def test_dry_run_prices_api_models(tmp_path, call_cache):
    r = ok(run_cli("eval", "--prompt", str(EXAMPLES / "prompts/sentiment_zeroshot.yaml"),
                   "--data", str(EXAMPLES / "data/nsmc_three_dev_300.jsonl"), "--limit", "10",
                   "--model", "openai:gpt-4o-mini", "--dry-run", "--out", str(tmp_path / "o"),
                   env={**call_cache, "OPENAI_API_KEY": "sk-NOT-A-REAL-KEY"}))
    assert "$" in r.stdout and "NOT-A-REAL-KEY" not in r.stdout + r.stderr
