import json

import numpy as np
import pytest
from scipy.stats import binomtest

from tunelab.evaluate.metrics import (INVALID, compare_to_best, confusion_matrix, macro_f1, per_label_scores,
                                      summarize_cell)
from tunelab.evaluate.results import EvalRow
from tunelab.stats import wilson_interval

LABELS = ["pos", "neg", "neu"]


def row(item, gold, pred, *, sample=0, complied=True, cached=False, latency=100.0, **extra):
    correct = None if gold is None else (pred == gold)
    return EvalRow(variant="v", model="m", dataset="d", item_id=str(item), sample=sample, gold=gold, prediction=pred,
                   correct=correct, complied=complied, prompt_tokens=50, completion_tokens=3, latency_ms=latency,
                   cached=cached, **extra)


def summarize(*args, **kw) -> dict:
    """summarize_cell's result as its JSON file holds it."""
    return summarize_cell(*args, **kw).to_json()


def compare(*args, **kw) -> dict:
    return {k: v.to_json() for k, v in compare_to_best(*args, **kw).items()}


# -- helpers against hand-computed values ----------------------------------------------------------
GOLD = ["pos", "pos", "pos", "neg", "neg", "neu"]
PRED = ["pos", "pos", "neg", "neg", None, "pos"]


def test_confusion_matrix_hand():
    m = confusion_matrix(GOLD, PRED, LABELS)
    #          pos neg neu (invalid)
    assert m == [[2, 1, 0, 0],   # gold pos
                 [0, 1, 0, 1],   # gold neg
                 [1, 0, 0, 0]]   # gold neu
    assert confusion_matrix(["pos", None], ["pos", "neg"], LABELS)[0][0] == 1  # gold None skipped
    assert confusion_matrix(["pos"], ["banana"], LABELS)[0][3] == 1  # outside the label set -> invalid


def test_macro_f1_and_per_label_hand():
    # pos: tp 2, fp 1, fn 1 -> F1 4/6; neg: tp 1, fp 1, fn 1 -> 2/4; neu: tp 0, fn 1 -> 0
    assert macro_f1(GOLD, PRED, LABELS) == pytest.approx((4 / 6 + 0.5 + 0.0) / 3)
    pl = per_label_scores(GOLD, PRED, LABELS)
    assert pl["pos"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert pl["neg"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pl["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # a label absent from gold and predictions is not averaged in
    assert macro_f1(["pos", "neg"], ["pos", "neg"], LABELS) == 1.0
    with pytest.raises(ValueError, match="the same length"):
        macro_f1(["pos"], [], LABELS)


# -- summarize_cell --------------------------------------------------------------------------------
def test_summarize_label_cell():
    rows = [row(i, g, p, cached=(i == 0), latency=0.0 if i == 0 else 100.0 + i)
            for i, (g, p) in enumerate(zip(GOLD, PRED))]
    rows[4].complied = False
    s = summarize(rows, "label", LABELS)
    json.dumps(s)  # serialisable
    assert (s["n_items"], s["n_samples"], s["cached"]) == (6, 1, 1)
    acc = s["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(3 / 6)
    assert (acc["low"], acc["high"]) == pytest.approx(wilson_interval(3, 6))
    assert s["metrics"]["macro_f1"]["value"] == pytest.approx(macro_f1(GOLD, PRED, LABELS))
    assert s["metrics"]["compliance"]["value"] == pytest.approx(5 / 6)
    assert "json_valid" not in s["metrics"]
    assert s["confusion"] == {"labels": [*LABELS, INVALID], "matrix": confusion_matrix(GOLD, PRED, LABELS)}
    assert set(s["per_label"]) == set(LABELS)
    assert s["tokens"] == {"prompt_mean": 50.0, "completion_mean": 3.0, "prompt_total": 300, "completion_total": 18}
    assert s["latency_ms"]["mean"] == pytest.approx(np.mean([101, 102, 103, 104, 105]))  # cached row left out
    assert s["latency_ms"]["p50"] == pytest.approx(103)
    assert s["pass_rate"] is None and s["flaky_items"] is None


def test_summarize_repeated_sampling():
    rows = []
    outcomes = {"a": [1, 1, 1], "b": [1, 0, 1], "c": [0, 0, 0], "d": [0, 1, 0]}
    for item, outs in outcomes.items():
        for s, ok in enumerate(outs):
            rows.append(row(item, "pos", "pos" if ok else "neg", sample=s))
    s = summarize(rows, "label", LABELS, n_boot=500)
    assert s["n_samples"] == 3 and s["n_items"] == 4
    assert s["pass_rate"] == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 0.0, "d": 1 / 3})
    assert s["flaky_items"] == 2
    acc = s["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(0.5)
    assert acc["low"] <= acc["value"] <= acc["high"]
    assert summarize(rows, "label", LABELS, n_boot=500) == s  # deterministic


def test_summarize_no_gold_and_json_task():
    rows = [row(i, None, {"x": i} if i % 3 else None, json_parsed=bool(i % 3), complied=bool(i % 2))
            for i in range(12)]
    s = summarize(rows, "json", None)
    json.dumps(s)
    assert "accuracy" not in s["metrics"] and "macro_f1" not in s["metrics"]
    assert s["metrics"]["json_valid"]["value"] == pytest.approx(8 / 12)
    assert s["metrics"]["schema_valid"] == s["metrics"]["compliance"]
    assert s["metrics"]["compliance"]["value"] == pytest.approx(6 / 12)
    with pytest.raises(ValueError, match="at least one result row"):
        summarize_cell([], "json", None)


# -- compare_to_best -------------------------------------------------------------------------------
def _cell(correct: list[bool], prefix: str = "") -> list[dict]:
    return [row(f"{prefix}{i}", "pos", "pos" if ok else "neg") for i, ok in enumerate(correct)]


def test_compare_to_best():
    rng = np.random.default_rng(0)
    best = rng.random(200) < 0.8
    close = best.copy()
    close[:6] = ~close[:6]  # a handful of differences
    bad = rng.random(200) < 0.4
    cells = {"few_shot": _cell(list(close)), "cot": _cell(list(best)), "zero_shot": _cell(list(bad))}
    out = compare(cells)
    assert out["cot"]["vs"] is None and out["cot"]["significant"] is False
    for name, arr in (("few_shot", close), ("zero_shot", bad)):
        r = out[name]
        assert r["vs"] == "cot"
        assert r["lost"] == int(np.sum(best & ~arr)) and r["gained"] == int(np.sum(~best & arr))
        assert r["p_value"] == pytest.approx(binomtest(r["lost"], r["lost"] + r["gained"], 0.5).pvalue)
        assert r["diff"] == pytest.approx(arr.mean() - best.mean())
        assert r["p_holm"] >= r["p_value"]
    assert out["zero_shot"]["significant"] and not out["few_shot"]["significant"]
    ps = sorted([out["few_shot"]["p_value"], out["zero_shot"]["p_value"]])
    assert min(out["few_shot"]["p_holm"], out["zero_shot"]["p_holm"]) == pytest.approx(2 * ps[0])
    json.dumps(out)


def test_compare_pairs_by_item_and_uses_majority_with_repeats():
    # best: right on items 0-9; other: right only on 0-4, and has an extra item not in best
    a = [row(i, "pos", "pos", sample=s) for i in range(10) for s in range(3)]
    b = [row(i, "pos", "pos" if (i < 5 or s == 0) else "neg", sample=s) for i in range(10) for s in range(3)]
    b.append(row(99, "pos", "neg"))
    out = compare({"a": a, "b": b})
    assert out["b"]["vs"] == "a"
    assert (out["b"]["lost"], out["b"]["gained"], out["b"]["n"]) == (5, 0, 10)  # 1-of-3 passes -> majority wrong


def test_compare_other_metrics_and_errors():
    cells = {"x": [row(i, None, "pos", complied=i < 8) for i in range(10)],
             "y": [row(i, None, "pos", complied=True) for i in range(10)]}
    assert compare(cells, "accuracy") == {}  # no gold anywhere
    out = compare(cells, "compliance")
    assert out["y"]["vs"] is None and (out["x"]["lost"], out["x"]["gained"]) == (2, 0)
    f1 = compare({"p": _cell([True] * 5 + [False] * 5), "q": _cell([True] * 9 + [False])}, "macro_f1")
    assert f1["q"]["vs"] is None and f1["p"]["vs"] == "q"
    with pytest.raises(ValueError, match="cannot compare"):
        compare(cells, "bleu")
