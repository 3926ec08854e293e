"""Runs that must not mix (tunelab.train.rundir): --resume continues only a run with the same resolved config (one
line lists what differs), and a new run into an --out that holds one is refused unless --force, which removes only the
run's own files."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from helpers.cli import assert_clean_error, ok
from helpers.train import chat_rows, common, run_train


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, chat_file):
    """A finished 4-step run with checkpoints at steps 2 (and its args)."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    args = common(tiny_model_dir, chat_file, out, "--max-steps", "4", "--checkpoint-every", "2")
    ok(run_train(*args))
    return out, args


def snapshot(out):
    return {f.relative_to(out).as_posix(): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_the_run_records_its_resolved_config_and_hash(finished):
    out, _ = finished
    rc = json.loads((out / "run_config.json").read_text())
    assert rc["config"]["optim.lr"] == 0.005 and rc["config"]["lora.r"] == 4 and rc["config"]["inputs.data.path"]
    assert "out" not in rc["config"] and "train.threads" not in rc["config"]
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["config_hash"] == rc["hash"]


@pytest.mark.parametrize("change, needles", [
    (["--lr", "1e-3", "--data", "OTHER"], ["optim.lr 0.005 -> 0.001", "data.path", "inputs.data.path"]),
    (["--lora-r", "8"], ["lora.r 4 -> 8"]),
])
def test_resume_with_another_config_is_one_line_and_touches_nothing(tmp_path, finished, change, needles):
    out, args = finished
    before = snapshot(out)
    if "OTHER" in change:
        change = [str(write_jsonl(tmp_path / "other.jsonl", chat_rows(40)[::-1])) if c == "OTHER" else c
                  for c in change]
    p = run_train(*args, *change, "--resume")
    assert_clean_error(p, f"out: {out} holds a run with another config (", *needles,
                       "resume it with its own config, or train into a new --out")
    assert snapshot(out) == before


def test_a_new_run_into_a_finished_one_is_refused_and_force_replaces_only_its_files(tmp_path, tiny_model_dir,
                                                                                   chat_file):
    out = tmp_path / "run"
    args = common(tiny_model_dir, chat_file, out, "--max-steps", "2")
    ok(run_train(*args))
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert_clean_error(run_train(*args, "--lr", "1e-3"),
                       f"out: {out} holds a finished run (adapter, metrics.jsonl, report.json, report.html): add "
                       "--resume to continue it, --force to replace it, or choose a new --out")
    assert snapshot(out) == before
    assert_clean_error(run_train(*args, "--resume", "--force"), "--resume continues the run in --out with its own "
                                                                "config, --force starts it over: give one of them")
    p = ok(run_train(*args, "--lr", "1e-3", "--force"))
    assert "--force: removed the earlier run's adapter, metrics.jsonl, report.json, report.html, run_config.json" \
        in p.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "run_config.json").read_text())["config"]["optim.lr"] == 0.001
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2   # one run's steps, not two runs'


def test_resume_may_change_what_does_not_touch_the_weights(finished):
    out, args = finished
    p = ok(run_train(*args, "--resume", "--threads", "1", "--set", "train.log_every=2", "--checkpoint-every", "3"))
    assert "resumed from step-000002" in p.stderr


def test_resume_takes_the_same_files_at_another_path(tmp_path, tiny_model_dir, chat_file):
    """A moved checkout, or the config given by another path: the input files' paths differ, their digests do not,
    so it is the same run; changed contents at the new path are still refused."""
    out = tmp_path / "run"
    ok(run_train(*common(tiny_model_dir, chat_file, out, "--max-steps", "3", "--checkpoint-every", "2")))
    moved = tmp_path / "moved" / "chat.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(chat_file.read_bytes())
    p = ok(run_train(*common(tiny_model_dir, moved, out, "--max-steps", "3", "--checkpoint-every", "2"), "--resume"))
    assert "resumed from step-000002" in p.stderr
    assert json.loads((out / "run_config.json").read_text())["config"]["data.path"] == str(moved)
    moved.write_bytes(chat_file.read_bytes() + chat_file.read_bytes())
    assert_clean_error(run_train(*common(tiny_model_dir, moved, out, "--max-steps", "3", "--checkpoint-every", "2"),
                                 "--resume"), "holds a run with another config (", "inputs.data.path")
