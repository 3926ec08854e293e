"""`tunelab run` end to end as a user runs it (the real CLI in a subprocess, a tiny random Llama with the bundled
tokenizer, 16 eval items, 4 LoRA steps): the run folder, numbers that agree with the per-item results,
stage caching by content hash, resuming a killed run, --force / --only, and `tunelab compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scipy.stats import binomtest

from helpers import read_jsonl, write_yaml
from helpers.cli import ok, run_cli, tunelab_cmd
from helpers.processes import sigkill_when
from helpers.run import actions, experiment, run_env, state
from helpers.train import checkpointed

STAGES = ["eval", "train/lora", "eval_after", "serve"]


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    """One complete run (eval -> train (4 steps) -> eval_after -> serve smoke test); later tests copy its folder."""
    d = tmp_path_factory.mktemp("run")
    exp = write_yaml(d / "exp.yaml", experiment(tiny_model_dir, serve={"mode": "smoke", "max_tokens": 4}))
    out = d / "out"
    p = ok(run_cli("run", exp, "--out", out, env=run_env(d)))
    return exp, out, p, d


@pytest.fixture()
def copy(first_run, tmp_path) -> Path:
    """A copy of the first run's folder, for a test that runs on in it."""
    return Path(shutil.copytree(first_run[1], tmp_path / "out"))


def test_run_folder_holds_every_artifact(first_run):
    exp, out, p, _ = first_run
    assert actions(out) == {k: ("done", "ran") for k in STAGES}
    for f in ("run.json", "summary.json", "report.html", "env.json", "resolved.json", "experiment.yaml",
              "configs/eval.yaml", "configs/train_lora.yaml", "eval/results.jsonl", "eval/summary.json",
              "eval/report.html", "train/lora/adapter/adapter_model.safetensors",
              "train/lora/adapter/adapter_config.json",
              "train/lora/metrics.jsonl", "train/lora/report.json", "eval_after/results.jsonl",
              "eval_after/summary.json", "serve/smoke.json", "serve/command.txt", "logs/run.log", "logs/eval.log",
              "logs/train_lora.log", "logs/eval_after.log", "prompts/zero_shot.yaml"):
        assert (out / f).is_file(), f
    assert (out / "experiment.yaml").read_text() == exp.read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["packages"]["peft"]
    assert env["seed"] == 0 and env["cpu"]["cores"] >= 1 and env["python"]
    assert env["git"]["tunelab"]["commit"]  # this checkout is a git repository
    st = state(out)
    for k in STAGES:
        e = st["stages"][k]
        assert len(e["hash"]) == 16 and e["output_hash"] and e["cost"]["wall_s"] >= 0 and e["cost"]["peak_rss_mb"] > 0
    assert "step 4/4" in (out / "logs" / "train_lora.log").read_text()
    smoke = json.loads((out / "serve" / "smoke.json").read_text())
    asked = [a["model"] for a in smoke["answers"]]
    assert smoke["ok"] and len(asked) == 2 and asked[1] == "lora" and asked[0] in smoke["served_models"]
    assert all(isinstance(a["answer"], str) and a["completion_tokens"] >= 1 for a in smoke["answers"])
    assert "lora" in smoke["served_models"] and "--adapter lora=" in (out / "serve" / "command.txt").read_text()
    assert f"report: {out / 'report.html'}" in p.stdout
    for k in STAGES:
        assert any(line.startswith(k) and " ran " in line for line in p.stdout.splitlines()), (k, p.stdout)


def test_summary_agrees_with_the_result_rows(first_run):
    _, out, _, _ = first_run
    s = json.loads((out / "summary.json").read_text())
    rows = read_jsonl(out / "eval" / "results.jsonl")
    acc = {}
    for v in ("short", "few_shot", "zero_shot"):
        mine = [r for r in rows if r["variant"] == v]
        assert len(mine) == 16
        acc[v] = sum(r["correct"] for r in mine) / 16
    by_name = {p["variant"]: p for p in s["prompts"]}
    for v, a in acc.items():
        assert by_name[v]["accuracy"]["value"] == pytest.approx(a)
        assert by_name[v]["accuracy"]["low"] <= a <= by_name[v]["accuracy"]["high"]
    best = s["best_prompt"]["variant"]
    assert acc[best] == max(acc.values()) and by_name[best]["is_best"]

    tuned = [r for r in read_jsonl(out / "eval_after" / "results.jsonl") if r["model"] == "lora"]
    assert sorted(r["item_id"] for r in tuned) == sorted(r["item_id"] for r in rows if r["variant"] == best)
    lora = next(m for m in s["methods"] if m["name"] == "lora")
    a_lora = sum(r["correct"] for r in tuned) / len(tuned)
    assert lora["accuracy"]["value"] == pytest.approx(a_lora)
    assert lora["prompt"] == "short" and lora["train"]["steps"] == 4
    vb = lora["vs_best"]
    assert vb["baseline"] == best and vb["n"] == 16
    assert vb["diff"]["value"] == pytest.approx(a_lora - acc[best])
    assert vb["diff"]["low"] <= vb["diff"]["value"] <= vb["diff"]["high"]
    assert vb["a"]["value"] == pytest.approx(acc[best]) and vb["b"]["value"] == pytest.approx(a_lora)
    best_ok = {r["item_id"]: r["correct"] for r in rows if r["variant"] == best}
    lora_ok = {r["item_id"]: r["correct"] for r in tuned}
    lost = sum(best_ok[i] and not lora_ok[i] for i in best_ok)
    gained = sum(lora_ok[i] and not best_ok[i] for i in best_ok)
    assert (vb["lost"], vb["gained"]) == (lost, gained)
    want_p = binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0
    assert vb["p_value"] == pytest.approx(want_p)
    # before/after on the same prompt comes from the eval stage's own rows for that prompt
    short_ok = {r["item_id"]: r["correct"] for r in rows if r["variant"] == "short"}
    assert lora["vs_before"]["diff"]["value"] == pytest.approx(a_lora - acc["short"])
    assert lora["vs_before"]["n"] == len(short_ok)
    # the cost table adds up the stages
    cost = s["cost"]
    assert [c["stage"] for c in cost["stages"]] == STAGES
    assert cost["total_wall_s"] == pytest.approx(sum(c["wall_s"] for c in cost["stages"]), abs=0.05)
    assert cost["stages"][0]["tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert cost["teacher_usd"] is None
    # the verdict is the comparison's: significant on the Holm-adjusted p when there is one
    sig = vb["significant"]
    assert sig == ((vb["p_holm"] if vb["p_holm"] is not None else vb["p_value"]) < vb["alpha"])
    want = ("Tuning beat prompting" if sig and vb["diff"]["value"] > 0 else "Prompting beat tuning" if sig
            else "No significant difference between tuning and prompting")
    assert s["verdict"]["text"].split(":")[0] == want


def test_second_run_skips_every_stage(first_run, copy):
    exp, out, _, d = first_run
    before = state(copy)
    p = ok(run_cli("run", exp, "--out", copy, env=run_env(d)))
    assert actions(copy) == {k: ("done", "cached") for k in STAGES}
    after = state(copy)
    assert {k: v["hash"] for k, v in after["stages"].items()} == {k: v["hash"] for k, v in before["stages"].items()}
    assert after["invocations"] == before["invocations"] + 1
    assert p.stdout.count(" cached ") == len(STAGES)
    # the summary and report are rebuilt from the same stage outputs
    s0 = json.loads((out / "summary.json").read_text())
    s1 = json.loads((copy / "summary.json").read_text())
    assert s1["prompts"] == s0["prompts"] and s1["methods"] == s0["methods"]


def test_changing_the_lora_lr_redoes_only_train_and_what_reads_it(first_run, copy, tiny_model_dir, tmp_path):
    _, out, _, d = first_run
    changed = experiment(tiny_model_dir, serve={"mode": "smoke", "max_tokens": 4})
    changed["train"][0]["optim"]["lr"] = 1.0e-3
    exp2 = write_yaml(tmp_path / "exp.yaml", changed)
    ok(run_cli("run", exp2, "--out", copy, env=run_env(d)))
    assert actions(copy) == {"eval": ("done", "cached"), "train/lora": ("done", "ran"),
                             "eval_after": ("done", "ran"), "serve": ("done", "ran")}
    cfg = (copy / "configs" / "train_lora.yaml").read_text()
    assert "lr: 0.001" in cfg
    assert state(copy)["stages"]["train/lora"]["result"]["lr"] == pytest.approx(1e-3)

    # `tunelab compare` names the changed field, the metric deltas and the stages that differ
    p = ok(run_cli("compare", out, copy, env=run_env(d)))
    assert "train.lora.optim.lr" in p.stdout and "0.005" in p.stdout and "0.001" in p.stdout
    assert "train_config" not in p.stdout  # the merged train config repeats the same change: shown once
    assert "lora: accuracy %" in p.stdout and "prompt short: accuracy %" in p.stdout
    assert "train/lora" in p.stdout and "inputs differ" in p.stdout
    stages_section = p.stdout[p.stdout.index("stages"):]
    assert "eval " not in stages_section.replace("eval_after", "")  # the eval stage is the same in both runs


def test_killed_training_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    exp = experiment(tiny_model_dir)
    exp["data"]["train_limit"] = 24
    exp["train"][0]["train"] = {"max_steps": 6, "batch_size": 4, "micro_batch_size": 4}
    exp["train"][0]["checkpoint"] = {"every_steps": 1}
    path = write_yaml(tmp_path / "exp.yaml", exp)
    out = tmp_path / "out"
    env = run_env(tmp_path, TUNELAB_TRAIN_STEP_SLEEP="0.4")
    latest = out / "train" / "lora" / "checkpoints" / "latest"
    sigkill_when(tunelab_cmd("run", path, "--out", out), checkpointed(latest, 2), env=env)
    assert actions(out) == {"eval": ("done", "ran"), "train/lora": ("running", "ran")}
    assert not (out / "train" / "lora" / "adapter").exists()
    p = ok(run_cli("run", path, "--out", out, env=run_env(tmp_path)))
    assert actions(out) == {"eval": ("done", "cached"), "train/lora": ("done", "resumed"),
                            "eval_after": ("done", "ran")}
    rep = json.loads((out / "train" / "lora" / "report.json").read_text())
    assert rep["steps"] == 6 and rep["resumed_from"] is not None and rep["resumed_from"] >= 2
    steps = [r["step"] for r in read_jsonl(out / "train" / "lora" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed" in p.stdout


def test_force_and_only_select_stages(first_run, copy):
    exp, _, _, d = first_run
    ok(run_cli("run", exp, "--out", copy, "--only", "eval", "--force", "eval", env=run_env(d)))
    assert actions(copy) == {"eval": ("done", "ran"), "train/lora": ("done", "skipped"),
                             "eval_after": ("done", "skipped"), "serve": ("done", "skipped")}
    # eval ran again with the same predictions (greedy), so nothing downstream is out of date
    ok(run_cli("run", exp, "--out", copy, env=run_env(d)))
    assert actions(copy) == {k: ("done", "cached") for k in STAGES}
    ok(run_cli("run", exp, "--out", copy, "--force", "train", "--only", "train", env=run_env(d)))
    assert actions(copy)["train/lora"] == ("done", "ran") and actions(copy)["eval"] == ("done", "skipped")
