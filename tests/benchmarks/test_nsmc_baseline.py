"""benchmarks/nsmc_baseline.py: the lexical yardstick fits, pairs with a trained model's eval rows, rejects bad
input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EXAMPLES, ROOT, read_jsonl, write_jsonl
from helpers.cli import assert_clean_error, ok

pytest.importorskip("sklearn")

SCRIPT = ROOT / "benchmarks" / "nsmc_baseline.py"
DATA = EXAMPLES / "data"


def head(src: Path, dst: Path, n: int) -> list[dict]:
    """The first ``n`` records of ``src``, also written to ``dst``."""
    rows = read_jsonl(src)[:n]
    write_jsonl(dst, rows)
    return rows


def run(*args: str) -> subprocess.CompletedProcess:
    """benchmarks/nsmc_baseline.py ARGS, to its end."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_fits_scores_and_pairs_with_a_trained_models_rows(tmp_path):
    head(DATA / "nsmc_binary_train_512.jsonl", tmp_path / "train.jsonl", 200)
    dev = head(DATA / "nsmc_binary_dev_200.jsonl", tmp_path / "dev.jsonl", 40)
    # a "trained model" that is right on the first 30 reviews and wrong on the last 10, as tunelab eval writes rows
    rows = []
    for i, r in enumerate(dev):
        right = i < 30
        pred = r["label"] if right else ("Negative" if r["label"] == "Positive" else "Positive")
        scores = {"Positive": -0.1 if pred == "Positive" else -3.0, "Negative": -0.1 if pred == "Negative" else -3.0}
        rows.append({"model": "after", "item_id": r["id"], "correct": right, "scores": scores})
        rows.append({"model": "before", "item_id": r["id"], "correct": False, "scores": scores})
    write_jsonl(tmp_path / "results.jsonl", rows)

    p = ok(run("--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"), "--folds", "2",
            "--curve", "100", "--against", str(tmp_path / "results.jsonl")))
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["n_train"] == 200 and out["n_dev"] == 40
    assert 0 <= out["baseline_accuracy"] <= 100 and out["ci"][0] <= out["baseline_accuracy"] <= out["ci"][1]
    assert [c["train"] for c in out["curve"]] == [100, 200]
    assert out["curve"][-1]["accuracy"] == out["baseline_accuracy"]
    pair = out["against"][0]
    assert pair["model_accuracy"] == 75.0 and pair["baseline_accuracy"] == out["baseline_accuracy"]
    # the discordant counts add up to the two accuracies, and the model is wrong only on the last 10
    base_right = round(out["baseline_accuracy"] * 40 / 100)
    assert pair["only_model"] - pair["only_baseline"] == 30 - base_right
    assert pair["both_wrong"] + pair["only_baseline"] == 10
    assert pair["diff"] == pytest.approx(75.0 - out["baseline_accuracy"], abs=0.01)


@pytest.mark.parametrize("content, where", [
    ('{"text": "좋다"}\n', ["train.jsonl:1: expected the fields text, label; missing label"]),
    ('{"text": "좋다", "label": "Positive"}\nnot json\n',
     ["train.jsonl:2: malformed JSON", "expected one JSON object per line"]),
])
def test_bad_training_file_exits_2_with_one_line(tmp_path, content, where):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    assert_clean_error(run("--train", str(tmp_path / "train.jsonl")), *where)


def test_a_missing_results_file_exits_2_before_any_fitting(tmp_path):
    p = run("--against", str(tmp_path / "missing.jsonl"))
    assert_clean_error(p, "no such file: ", "missing.jsonl")
    assert not p.stdout


def test_results_scored_over_other_labels_exit_2(tmp_path):
    head(DATA / "nsmc_three_train_6000.jsonl", tmp_path / "train.jsonl", 90)
    dev = head(DATA / "nsmc_three_dev_900.jsonl", tmp_path / "dev.jsonl", 20)
    rows = [{"model": "after", "item_id": r["id"], "correct": True, "scores": {"Positive": -1.0, "Negative": -2.0}}
            for r in dev]
    write_jsonl(tmp_path / "results.jsonl", rows)
    p = run("--train", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"), "--folds", "2",
            "--curve", "--against", str(tmp_path / "results.jsonl"))
    assert_clean_error(p, "are not the training labels ['Negative', 'Neutral', 'Positive']")
    assert not p.stdout  # before any fitting
