"""Result files are written and read through their models (tunelab/results.py and each package's results module),
and files written by tunelab 0.1 (schema 1, without a ``schema`` field) are still read, upgraded to the current
shape with the same numbers. tests/data/schema1_run/ is a `tunelab run examples/experiments/nsmc.yaml --limit 32`
folder written by commit e5bf23d; tests/data/schema1_train_report.json a `tunelab train ... --eval-data
--ema-decay 0.5` report of the same commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import DataError
from tunelab.evaluate.results import EvalSummary
from tunelab.run.results import EvalAfterSummary, RunState, RunSummary, TrainStageResult
from tunelab.stats import PairedComparison
from tunelab.train.results import TrainReport

DATA = Path(__file__).parent / "data"
V1 = DATA / "schema1_run"


def raw(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_schema1_eval_summary_reads_with_the_same_numbers():
    old = raw(V1 / "eval" / "summary.json")
    new = EvalSummary.read(V1 / "eval" / "summary.json")
    assert "schema" not in old and new.version == EvalSummary.SCHEMA == 2
    for c_old, c in zip(old["cells"], new.cells):
        assert c.metrics["accuracy"].value == c_old["metrics"]["accuracy"]["value"]
        comp = c_old["comparison"]
        assert (c.comparison.lost, c.comparison.gained, c.comparison.n) == (comp["b"], comp["c"], comp["n_paired"])
        assert c.comparison.p_holm == comp["p_holm"]
    assert new.best.variant == old["best"]["variant"]
    # written again, it is the current shape and reads back equal
    again = EvalSummary.model_validate_json(new.model_dump_json())
    assert again == new and json.loads(new.model_dump_json())["schema"] == 2


def test_schema1_run_summary_paired_comparisons_upgrade():
    old = raw(V1 / "summary.json")
    new = RunSummary.read(V1 / "summary.json")
    m_old, m = old["methods"][0], new.methods[0]
    v_old, v = m_old["vs_best"], m.vs_best
    assert v.baseline == v_old["baseline"] and v.n == v_old["n"]
    assert (v.diff.value, v.diff.low, v.diff.high) == (v_old["diff"], v_old["diff_low"], v_old["diff_high"])
    assert v.a.value == pytest.approx(v_old["a"]) and v.b.value == pytest.approx(v_old["b_acc"])
    assert (v.gained, v.lost, v.p_value, v.p_holm) == (v_old["gained"], v_old["lost"], v_old["p_value"],
                                                        v_old["p_holm"])
    assert v.a.low <= v.a.value <= v.a.high  # the Wilson interval recomputed from the rate and n
    assert m.train.steps == m_old["train"]["steps"] and new.verdict.text == old["verdict"]["text"]
    assert [p.variant for p in new.prompts] == [p["variant"] for p in old["prompts"]]


def test_schema1_run_state_and_eval_after_upgrade():
    state = RunState.read(V1 / "run.json")
    assert state.version == 2 and list(state.stages) == ["eval", "train/lora", "eval_after", "serve"]
    train = state.stages["train/lora"].result
    assert isinstance(train, TrainStageResult) and train.kind == "adapter"
    after = state.stages["eval_after"].result
    old = raw(V1 / "run.json")["stages"]["eval_after"]["result"]["lora"]["vs_best"]
    assert after.methods["lora"].vs_best.diff.value == old["diff"]
    ea = EvalAfterSummary.read(V1 / "eval_after" / "summary.json")
    assert ea.methods["lora"].vs_before.n == raw(V1 / "eval_after" / "summary.json")["methods"]["lora"]["vs_before"]["n"]


def test_schema1_train_report_before_after_upgrade():
    path = DATA / "schema1_train_report.json"
    old = raw(path)["eval"]
    rep = TrainReport.read(path)
    for key in ("variants", "ema"):
        for v, c_old in old[key].items():
            c = getattr(rep.eval, key)[v]
            assert isinstance(c, PairedComparison)
            assert (c.a.value, c.a.low, c.a.high) == (c_old["before"], *c_old["before_ci"])
            assert (c.b.value, c.diff.value, c.p_value) == (c_old["after"], c_old["diff"], c_old["mcnemar_p"])
            assert (c.gained, c.lost) == (c_old["gained"], c_old["lost"])
    assert rep.history[-1].step == rep.steps


def test_compare_reads_a_schema1_run_folder(tmp_path):
    """`tunelab compare` of an old run folder with itself: read through the models; only the always-shown sections,
    every delta zero, no configuration, environment, cost or stage differences."""
    from tunelab.run.compare import compare_runs

    sections = dict(compare_runs(V1, V1))
    assert list(sections) == ["headline", "prompts (base model)", "tuned models"]
    assert sections["headline"][0][1] == raw(V1 / "summary.json")["verdict"]["text"]
    assert {row[3] for row in sections["prompts (base model)"]} == {"+0.0"}


def test_bad_result_files_are_one_line(tmp_path):
    p = tmp_path / "summary.json"
    with pytest.raises(DataError, match="no such file"):
        EvalSummary.read(p)
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"summary.json:1: not valid JSON"):
        EvalSummary.read(p)
    p.write_text(json.dumps({"schema": 2, "title": "x"}), encoding="utf-8")
    with pytest.raises(DataError, match="not a EvalSummary file"):
        EvalSummary.read(p)
    p.write_text(json.dumps({**raw(V1 / "summary.json"), "surprise": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="surprise"):  # unknown keys are refused: writers and readers agree
        RunSummary.read(p)
