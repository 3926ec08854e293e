"""Teacher labels vs gold labels end to end, as an experiment of `tunelab run` (the stages of
examples/experiments/teacher_vs_gold.yaml: ``generate.inputs: train``, ``items: generated``, ``eval_after.compare``).

The teacher is the fault-injecting fake server on 127.0.0.1, programmed to give the gold label of each known training
text except for every 4th text, where it gives the other label: so the agreement numbers are known exactly. The
students are a tiny random Llama with the bundled tokenizer; the run is the real CLI in a subprocess. The test checks
what the teacher was sent, the numbers, the two students' data and recipe, the head-to-head comparison recomputed
from the per-item results, and that the API key is nowhere.
"""

from __future__ import annotations

import json
import threading

import pytest
import yaml
from scipy.stats import binomtest

from helpers import EXAMPLES, read_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok, run_cli
from helpers.fakeserver import FakeServer, Fault
from helpers.generate import SENTINEL, assert_no_secret
from helpers.run import DEV, SHORT, TRAIN, run_env

LABEL_CONFIG = EXAMPLES / "generate" / "nsmc_teacher_label.yaml"
LABELS = ["Positive", "Negative"]
OTHER = {"Positive": "Negative", "Negative": "Positive"}
N = 16


def tvg_experiment(model, url: str | None, **generate) -> dict:
    """The shipped experiment's stages on the tiny model: 16 training texts, 16 dev items, a few steps each."""
    cfg = yaml.safe_load(LABEL_CONFIG.read_text(encoding="utf-8"))
    cfg["prompt"] = str(SHORT)  # the teacher's prompt (the shipped one is two-shot: longer to render, same logic)
    cfg["contamination"]["eval_path"] = str(DEV)
    cfg["teacher"].update(model="fake-label", base_url=url, api_key_env="TVG_TEACHER_KEY",
                          price={"input": 0.15, "output": 0.6})
    recipe = {"prompt": "student", "max_seq_len": 512, "lora": {"r": 4, "alpha": 8}, "optim": {"lr": 5.0e-3},
              "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "seed": 3}}
    return {"name": "tvg", "model": str(model), "seed": 0,
            "data": {"eval": str(DEV), "eval_limit": N, "train": str(TRAIN), "train_limit": N},
            "prompts": {"student": str(SHORT)},
            "generate": {"config": cfg, "inputs": "train", **generate},
            "train": [{"name": "teacher", "data": "generated", **recipe},
                      {"name": "gold", "data": "gold", "items": "generated", **recipe}],
            "eval_after": {"prompt": "student", "compare": [["gold", "teacher"]]}}


@pytest.fixture(scope="module")
def tvg_run(tiny_model_dir, tmp_path_factory):
    from tunelab.prompts import load_prompt_spec

    d = tmp_path_factory.mktemp("tvg")
    spec = load_prompt_spec(SHORT)
    items = read_jsonl(TRAIN)[:N]
    expected = {it["id"]: OTHER[it["label"]] if k % 4 == 0 else it["label"] for k, it in enumerate(items)}
    # The teacher's answer, by the message it is sent: gold, except every 4th text (4 of 16) gets the other label.
    answers = {spec.render({"text": it["text"]})[-1]["content"]: expected[it["id"]] for it in items}
    assert len(answers) == N
    seen: list[str] = []
    lock = threading.Lock()

    def teacher(user_message: str) -> str | None:
        with lock:
            seen.append(user_message)
        return answers.get(user_message)

    env = run_env(d, TVG_TEACHER_KEY=SENTINEL)
    # Faults on the way: the labels must come through retries unchanged.
    with FakeServer(labels=LABELS, label_fn=teacher, api_key=SENTINEL,
                    fault_cycle=[Fault("429", retry_after=0.05), None, Fault("500"), None, None]) as srv:
        path = write_yaml(d / "tvg.yaml", tvg_experiment(tiny_model_dir, srv.url))
        p = ok(run_cli("run", path, "--out", d / "out", env=env, timeout=600))
        server = srv.stats()
    return {"out": d / "out", "p": p, "server": server, "seen": seen, "answers": answers, "items": items,
            "expected": expected, "env": env, "cache": d / "tunelab-cache"}


def test_agreement_numbers_by_hand():
    from tunelab.generate.compare import agreement

    gold = ["P"] * 6 + ["N"] * 4
    teacher = ["P", "P", "P", "P", "N", "N", "N", "N", "N", "P"]
    a = agreement(gold, teacher, ["P", "N"])
    # 4 + 3 agree of 10; teacher says P 5 times, gold P 6 times: pe = .6*.5 + .4*.5 = .5, kappa = (.7-.5)/.5
    assert a.n == 10 and a.agree == 7 and a.accuracy.value == 0.7
    assert a.expected_agreement == 0.5 and a.kappa == 0.4
    assert a.matrix == [[4, 2], [1, 3]]
    assert 0.39 < a.accuracy.low < 0.7 < a.accuracy.high < 0.92  # Wilson [0.397, 0.892]
    assert agreement(["P", "N"], ["P", "N"], ["P", "N"]).kappa == 1.0


def test_the_teacher_is_sent_the_texts_only(tvg_run):
    out, items = tvg_run["out"], tvg_run["items"]
    assert tvg_run["server"]["auth_headers"] == [f"Bearer {SENTINEL}"] and tvg_run["server"]["faults"]
    texts = read_jsonl(out / "generate" / "texts.jsonl")
    assert texts == [{"id": it["id"], "text": it["text"]} for it in items]  # the fields the prompt reads, no label
    assert sorted(set(tvg_run["seen"])) == sorted(tvg_run["answers"])
    data = read_jsonl(out / "generate" / "data.jsonl")
    assert [r["label"] for r in data] == [tvg_run["expected"][it["id"]] for it in items]  # in input order
    assert "gold_label" not in data[0]  # nothing gold reached the teacher's input file
    assert data[0]["provenance"]["teacher"] == "fake-label" and data[0]["provenance"]["source"] == "api"


def test_agreement_is_what_the_teacher_was_programmed_to_do(tvg_run):
    out, items, expected = tvg_run["out"], tvg_run["items"], tvg_run["expected"]
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    a = s["teacher"]["agreement"]
    assert (a["n"], a["agree"], a["accuracy"]["value"]) == (16, 12, 0.75)
    m = [[sum(1 for it in items if it["label"] == g and expected[it["id"]] == t) for t in LABELS] for g in LABELS]
    assert a["labels"] == LABELS and a["matrix"] == m
    gp, tp = sum(m[0]) / N, (m[0][0] + m[1][0]) / N
    pe = gp * tp + (1 - gp) * (1 - tp)
    assert a["kappa"] == round((0.75 - pe) / (1 - pe), 4)
    assert json.loads((out / "generate" / "agreement.json").read_text()) == a
    assert "agreement 75.0 [" in tvg_run["p"].stdout and "Cohen's kappa" in tvg_run["p"].stdout
    assert 'id="teacher"' in (out / "report.html").read_text(encoding="utf-8")


def test_two_students_one_recipe_same_texts(tvg_run):
    out, items = tvg_run["out"], tvg_run["items"]
    gold_data = read_jsonl(out / "train_data" / "gold.jsonl")
    assert [(g["id"], g["label"]) for g in gold_data] == [(it["id"], it["label"]) for it in items]
    cfgs = {k: yaml.safe_load((out / "configs" / f"train_{k}.yaml").read_text()) for k in ("teacher", "gold")}
    assert cfgs["teacher"]["data"]["path"] == str(out / "generate" / "data.jsonl")
    assert cfgs["gold"]["data"]["path"] == str(out / "train_data" / "gold.jsonl")
    for c in cfgs.values():
        c.pop("out"), c.pop("name")
        c["data"].pop("path")
    assert cfgs["teacher"] == cfgs["gold"] and cfgs["gold"]["train"]["seed"] == 3
    import torch
    from safetensors.torch import load_file

    w = {k: load_file(str(out / "train" / k / "adapter" / "adapter_model.safetensors")) for k in ("teacher", "gold")}
    assert w["teacher"].keys() == w["gold"].keys()
    assert any(not torch.equal(w["teacher"][k], w["gold"][k]) for k in w["teacher"])


def test_head_to_head_is_recomputed_from_the_rows(tvg_run):
    out = tvg_run["out"]
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    (pair,) = s["pairs"]
    assert (pair["baseline"], pair["model"]) == ("gold", "teacher")
    rows = read_jsonl(out / "eval_after" / "results.jsonl")
    right = {m: {r["item_id"]: r["correct"] for r in rows if r["model"] == m} for m in ("gold", "teacher")}
    assert len(right["gold"]) == len(right["teacher"]) == N
    gained = sum(right["teacher"][i] and not right["gold"][i] for i in right["gold"])
    lost = sum(right["gold"][i] and not right["teacher"][i] for i in right["gold"])
    assert (pair["gained"], pair["lost"], pair["n"]) == (gained, lost, N)
    assert pair["p_value"] == pytest.approx(binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0)
    diff = (sum(right["teacher"].values()) - sum(right["gold"].values())) / N
    assert pair["diff"]["value"] == pytest.approx(diff)
    assert "teacher vs gold" in (out / "report.html").read_text(encoding="utf-8")
    # the sentence printed says what the numbers say
    assert pair["significant"] == ((pair["p_holm"] if pair["p_holm"] is not None else pair["p_value"]) < pair["alpha"])
    d = pair["diff"]["value"] * 100
    if pair["significant"]:
        want = f"teacher {'beats' if d > 0 else 'is worse than'} gold by {abs(d):.1f} points ({d:+.1f} ["
    else:
        want = f"teacher vs gold: {d:+.1f} points ["
    assert want in tvg_run["p"].stdout, tvg_run["p"].stdout[-2000:]


def test_the_key_is_nowhere(tvg_run):
    p = tvg_run["p"]
    assert_no_secret(p.stdout, p.stderr, dirs=(tvg_run["out"], tvg_run["cache"]))
    assert "TVG_TEACHER_KEY" in (tvg_run["out"] / "configs" / "generate.yaml").read_text()  # the name, not the key


def test_inputs_train_needs_a_label_pipeline(tmp_path, tiny_model_dir):
    exp = tvg_experiment(tiny_model_dir, "http://127.0.0.1:9/v1")
    exp["generate"]["config"] = {"pipeline": "respond", "prompt": str(EXAMPLES / "generate" / "gsm8k_cot.prompt.yaml"),
                                 "data": {"path": str(EXAMPLES / "data" / "gsm8k_dev_50.jsonl")},
                                 "teacher": {"model": "gpt-4o-mini"}}
    path = write_yaml(tmp_path / "bad.yaml", exp)
    assert_clean_error(run_cli("run", path, "--out", tmp_path / "out", env=run_env(tmp_path)),
                       "bad.yaml:", "generate.inputs", "needs a label pipeline")
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_rejected_key_ends_the_run_with_one_line_and_no_key(tmp_path, tiny_model_dir):
    """The server refuses the key and echoes it back (as some do): one error line, nothing trained, no key."""
    with FakeServer(labels=LABELS, api_key="the-right-key") as srv:
        path = write_yaml(tmp_path / "tvg.yaml", tvg_experiment(tiny_model_dir, srv.url))
        p = run_cli("run", path, "--out", tmp_path / "out", env=run_env(tmp_path, TVG_TEACHER_KEY=SENTINEL))
    assert_clean_error(p, "rejected the API key (401)", last_line_only=True)  # after the stages' progress lines
    assert not (tmp_path / "out" / "train").exists()  # nothing trained on a failed labelling
    assert_no_secret(p.stdout, p.stderr, dirs=(tmp_path,))
