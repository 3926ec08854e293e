"""Bad experiment files and bad usage of `tunelab run` / `tunelab compare`: exit 2, one line on stderr that
names the file, the line and the field, no traceback, nothing run."""

from __future__ import annotations

import json

import pytest

from helpers.cli import assert_clean_error, run_cli
from helpers.run import DEV, FEW_SHOT, SHORT, TRAIN, run_env

GOOD = f"""name: bad-inputs
model: bundled
data:
  eval: {DEV}
  train: {TRAIN}
prompts:
  short: {SHORT}
  few_shot: {FEW_SHOT}
train:
  - name: lora
    prompt: short
    optim: {{lr: 3.0e-4}}
"""
#            line 1: name, 3: data, 4: eval, 6: prompts, 7: short, 9: train, 10: - name, 11: prompt, 12: optim


def _lines(text: str, lineno: int, new: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


CASES = {
    "unknown top-level field": (GOOD + "promts: {}\n", ["exp.yaml:13", "promts", "unknown field"]),
    "unknown nested field": (_lines(GOOD, 4, f"  evl: {DEV}"), ["exp.yaml:4", "data.evl", "unknown field",
                                                               "did you mean 'eval'"]),
    "typo in a data field": (GOOD.replace("  train: ", "  trian: ", 1), ["exp.yaml:5", "data.trian", "unknown field"]),
    "YAML syntax": (_lines(GOOD, 7, "  short: [unclosed"), ["exp.yaml:", "invalid YAML"]),
    "missing prompt file": (_lines(GOOD, 8, "  few_shot: nowhere/none.yaml"), ["exp.yaml:8", "prompts.few_shot",
                                                                              "no such file"]),
    "missing eval data": (_lines(GOOD, 4, "  eval: nowhere.jsonl"), ["exp.yaml:4", "data.eval", "no such file"]),
    "unknown train prompt": (_lines(GOOD, 11, "    prompt: shortt"), ["exp.yaml:11", "train.0.prompt", "'shortt'"]),
    "bad train override": (_lines(GOOD, 12, "    optim: {lr: -1}"), ["exp.yaml:12", "train.0.optim.lr",
                                                                     "greater than 0"]),
    "unknown train override": (_lines(GOOD, 12, "    optim: {learning_rate: 0.1}"),
                               ["exp.yaml:12", "train.0.optim.learning_rate", "unknown field", "allowed: lr,"]),
    "generated data without a generate stage": (GOOD + "    data: generated\n", ["exp.yaml:13", "train.0.data",
                                                                                  "generate"]),
    "bad inline prompt": (_lines(GOOD, 8, "  few_shot: {instruction: x, output: {type: colour}}"),
                          ["exp.yaml:8", "prompts.few_shot", "output"]),
    "duplicate method names": (GOOD + "  - name: lora\n", ["exp.yaml", "unique"]),
    "bad eval_after prompt": (GOOD + "eval_after: {prompt: nope}\n", ["exp.yaml:13", "eval_after.prompt", "'nope'"]),
    "not a mapping": ("- just\n- a list\n", ["exp.yaml:1", "expected a mapping"]),
    "empty file": ("", ["exp.yaml", "empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_experiment_is_one_line_with_file_and_line(case, tmp_path):
    text, needles = CASES[case]
    exp = tmp_path / "exp.yaml"
    exp.write_text(text, encoding="utf-8")
    p = run_cli("run", exp, "--out", tmp_path / "out", env=run_env(tmp_path), timeout=120)
    assert_clean_error(p, *needles)
    assert not (tmp_path / "out" / "run.json").exists()  # nothing ran


def test_the_good_experiment_loads(tmp_path):
    """The base of the cases above is valid: each case fails for its own reason."""
    from tunelab.run.resolve import load_experiment

    exp = tmp_path / "exp.yaml"
    exp.write_text(GOOD, encoding="utf-8")
    r = load_experiment(exp, limit=8)
    assert list(r.prompts) == ["short", "few_shot"] and r.methods[0].base_data["optim"]["lr"] == 3e-4
    assert r.methods[0].base_data["data"]["limit"] == 8 and r.methods[0].base_data["train"]["batch_size"] == 8


def test_missing_experiment_file(tmp_path):
    assert_clean_error(run_cli("run", tmp_path / "none.yaml", env=run_env(tmp_path)), "none.yaml", "no such file")


def test_unknown_stage_name(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(GOOD, encoding="utf-8")
    p = run_cli("run", exp, "--out", tmp_path / "out", "--only", "trian", env=run_env(tmp_path))
    assert_clean_error(p, "--only 'trian'", "eval, train/lora, eval_after")


def test_compare_needs_two_run_folders(tmp_path):
    assert_clean_error(run_cli("compare", tmp_path / "a", tmp_path / "b", env=run_env(tmp_path)),
                       "no such run folder", str(tmp_path / "a"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text(json.dumps({"stages": {}}))
    assert_clean_error(run_cli("compare", tmp_path / "a", tmp_path / "a", env=run_env(tmp_path)),
                       "summary.json is missing")
