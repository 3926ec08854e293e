"""Evals that succeed on garbage say so: items longer than the model's context (run and dry run), inputs that are
all or mostly empty, and labels under another field name (no gold answers: which fields there are, and the
prompt spec's target_field). Each warning is one `warning:` line on stderr and a note in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_jsonl
from helpers.cli import cli_env, ok, run_cli

SPEC = "instruction: Classify the review.\noutput: {type: label, labels: [Positive, Negative]}\nlayout: plain\n"


def spec_file(tmp: Path) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(SPEC, encoding="utf-8")
    return p


def run_eval(tmp: Path, rows: list[dict], *args: str):
    data = write_jsonl(tmp / "data.jsonl", rows)
    return ok(run_cli("eval", "-p", spec_file(tmp), "-d", data, "--out", tmp / "out", "--no-report", *args,
                      env=cli_env(NO_COLOR="1", COLUMNS="200", TUNELAB_CALL_CACHE=str(tmp / "calls.sqlite"))))


def warnings(p) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("warning: ")]


def notes(tmp: Path) -> list[str]:
    return json.loads((tmp / "out" / "summary.json").read_text(encoding="utf-8"))["notes"]


def test_too_long_item_is_named_in_the_dry_run(tmp_path):
    """The bundled model's context is 8,192 tokens: a review of ~36,000 tokens exceeds it."""
    rows = [{"id": "short", "text": "좋다", "label": "Positive"},
            {"id": "long", "text": "정말 재미있는 영화 " * 1500, "label": "Positive"}]
    p = run_eval(tmp_path, rows, "--dry-run")
    [w] = warnings(p)
    assert "1 of 2 items exceed the model's context of 8,192 tokens" in w
    assert "longest: item long" in w and f"{tmp_path / 'data.jsonl'}:2" in w
    assert "dry run" in p.stdout


def test_too_long_item_is_warned_in_the_run_and_noted(tmp_path, tiny_model_dir):
    """The tiny model's context is 2,048 tokens."""
    rows = [{"id": "a", "text": "정말 재미있는 영화 " * 150, "label": "Positive"},
            {"id": "b", "text": "싫다", "label": "Negative"}]
    p = run_eval(tmp_path, rows, "--model", str(tiny_model_dir))
    [w] = warnings(p)
    assert "1 of 2 items exceed the model's context of 2,048 tokens (longest: item a" in w
    assert any("exceed the model's context" in n for n in notes(tmp_path))


def test_fitting_items_give_no_warning(tmp_path, tiny_model_dir):
    rows = [{"id": "a", "text": "정말 재미있는 영화", "label": "Positive"}, {"id": "b", "text": "싫다", "label": "Negative"}]
    assert warnings(run_eval(tmp_path, rows, "--model", str(tiny_model_dir))) == []


def test_all_empty_inputs_are_warned(tmp_path, tiny_model_dir):
    rows = [{"id": str(i), "text": "  ", "label": lab} for i, lab in enumerate(["Positive", "Negative"] * 2)]
    p = run_eval(tmp_path, rows, "--model", str(tiny_model_dir))
    [w] = warnings(p)
    assert "all 4 items have an empty input" in w and "{{ text }}" in w
    assert any("all 4 items have an empty input" in n for n in notes(tmp_path))


def test_labels_under_another_field_name_the_fields_and_target_field(tmp_path, tiny_model_dir):
    rows = [{"id": "1", "text": "좋다", "sentiment": "Positive"}, {"id": "2", "text": "싫다", "sentiment": "Negative"}]
    p = run_eval(tmp_path, rows, "--model", str(tiny_model_dir))
    [w] = warnings(p)
    assert "no gold answers" in w and "the fields id, text, sentiment" in w
    assert "set target_field: sentiment in the prompt spec" in w
    assert any("target_field" in n for n in notes(tmp_path))
