"""Teacher labels vs gold labels end to end (examples/teacher_vs_gold.py, tunelab/generate/compare.py).

The teacher is the fault-injecting fake server on 127.0.0.1, programmed to give the gold label of each known
training text except for every 4th text, where it gives the other label: so the agreement numbers are known
exactly. The script runs as a user runs it (a subprocess), labels, trains two LoRA adapters and evaluates
them; the test checks the files it writes, the numbers, and that the API key is nowhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading

import pytest
import yaml

from fakeserver import FakeServer, Fault
from tunelab.errors import DataError
from test_generate_helpers import EXAMPLES, ROOT, SENTINEL, assert_no_secret, read_jsonl, write_config

SCRIPT = EXAMPLES / "teacher_vs_gold.py"
LABEL_CONFIG = EXAMPLES / "generate" / "nsmc_teacher_label.yaml"
TRAIN = EXAMPLES / "data" / "nsmc_binary_train_512.jsonl"
DEV = EXAMPLES / "data" / "nsmc_binary_dev_200.jsonl"
TEACHER_PROMPT = EXAMPLES / "prompts" / "sentiment_binary.yaml"  # the prompt of nsmc_teacher_label.yaml
SHORT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
LABELS = ["Positive", "Negative"]
OTHER = {"Positive": "Negative", "Negative": "Positive"}


def s_outputs(out) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))["outputs"]


def run_script(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    e = {**os.environ, **env}
    e.pop("OPENAI_API_KEY", None)
    e.pop("OPENAI_BASE_URL", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=e, cwd=ROOT,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------------
# the statistics (no model)
# ------------------------------------------------------------------------------------------------------
def test_agreement_numbers_by_hand():
    from tunelab.generate.compare import agreement

    gold = ["P"] * 6 + ["N"] * 4
    teacher = ["P", "P", "P", "P", "N", "N", "N", "N", "N", "P"]
    a = agreement(gold, teacher, ["P", "N"])
    # 4 + 3 agree of 10; teacher says P 5 times, gold P 6 times: pe = .6*.5 + .4*.5 = .5, kappa = (.7-.5)/.5
    assert a["n"] == 10 and a["agree"] == 7 and a["accuracy"] == 0.7
    assert a["expected_agreement"] == 0.5 and a["kappa"] == 0.4
    assert a["confusion"]["matrix"] == [[4, 2], [1, 3]]
    lo, hi = a["accuracy_ci"]
    assert 0.39 < lo < 0.7 < hi < 0.92  # Wilson [0.397, 0.892]
    assert agreement(["P", "N"], ["P", "N"], ["P", "N"])["kappa"] == 1.0


def test_compare_students_paired_mcnemar():
    from scipy.stats import binomtest

    from tunelab.generate.compare import compare_students

    ids = [str(i) for i in range(20)]
    a = {i: k < 14 for k, i in enumerate(ids)}  # 14 right
    b = {i: 3 <= k < 12 or k >= 18 for k, i in enumerate(ids)}  # 11 right
    r = compare_students({"A": a, "B": b}, "A", "B")
    only_a = sum(a[i] and not b[i] for i in ids)
    only_b = sum(b[i] and not a[i] for i in ids)
    assert (r["a_right_b_wrong"], r["a_wrong_b_right"]) == (only_a, only_b) == (5, 2)
    assert math.isclose(r["mcnemar_p"], binomtest(5, 7, 0.5).pvalue, abs_tol=1e-6)
    assert r["diff"] == 0.15 and r["diff_ci"][0] <= 0.15 <= r["diff_ci"][1]


def test_training_files_with_the_teacher_prompt_and_with_another(tmp_path):
    """Same prompt: the teacher's file is generate's chat.jsonl, checked against the gold rendering. Another
    student prompt: both files are rendered with it and differ only in the answers."""
    from tunelab.data.io import write_jsonl
    from tunelab.generate.compare import training_files
    from tunelab.prompts import load_prompt_spec

    teacher_spec, short = load_prompt_spec(TEACHER_PROMPT), load_prompt_spec(SHORT)
    items = read_jsonl(TRAIN)[:5]
    texts = [{"id": it["id"], "text": it["text"]} for it in items]
    teacher_labels = ["Positive", "Positive", "Negative", "Positive", "Negative"]
    data_rows = [{**t, "label": lab, "provenance": {"teacher": "t"}} for t, lab in zip(texts, teacher_labels)]
    gold = [it["label"] for it in items]
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"messages": teacher_spec.render(t) + [{"role": "assistant", "content": lab}],
                        "provenance": {"teacher": "t"}} for t, lab in zip(texts, teacher_labels)])

    tp, gp = training_files(tmp_path, teacher_spec, teacher_spec, texts, data_rows, gold, chat_path=chat)
    assert tp == chat
    g = read_jsonl(gp)
    assert [r["messages"] for r in g] == [teacher_spec.render(it) + [{"role": "assistant", "content": it["label"]}]
                                          for it in items]

    tp, gp = training_files(tmp_path, teacher_spec, short, texts, data_rows, gold, chat_path=chat)
    assert tp == tmp_path / "teacher.jsonl"
    t, g = read_jsonl(tp), read_jsonl(gp)
    assert [r["messages"][:-1] for r in t] == [r["messages"][:-1] for r in g] == [short.render(x) for x in texts]
    assert [r["messages"][-1]["content"] for r in t] == teacher_labels
    assert [r["messages"][-1]["content"] for r in g] == gold
    assert t[0]["provenance"] == {"teacher": "t"}

    # A chat.jsonl that does not match the prompt (edited by hand, another spec) is refused.
    write_jsonl(chat, [{"messages": short.render(x) + [{"role": "assistant", "content": "Positive"}]} for x in texts])
    with pytest.raises(DataError, match="differ before the answer"):
        training_files(tmp_path, teacher_spec, teacher_spec, texts, data_rows, gold, chat_path=chat)


def test_refuses_a_config_that_is_not_label(tmp_path):
    cfg = write_config(tmp_path / "respond.yaml", {
        "pipeline": "respond", "prompt": str(EXAMPLES / "generate" / "gsm8k_cot.prompt.yaml"),
        "data": {"path": str(EXAMPLES / "data" / "gsm8k_dev_50.jsonl")}, "teacher": {"model": "gpt-4o-mini"}})
    r = run_script("--label-config", str(cfg), "--out", str(tmp_path / "out"), env={"TUNELAB_CACHE": str(tmp_path)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "needs a label config" in r.stderr


def test_a_rejected_key_ends_the_run_with_one_line_and_no_key(tmp_path):
    """The server refuses the key and echoes it back (as some do): one error line, the key in no output."""
    with FakeServer(labels=LABELS, api_key="the-right-key") as srv:
        r = run_script("--base-url", srv.url, "--teacher-model", "fake-label", "--api-key-env", "TVG_TEACHER_KEY",
                       "--n", "4", "--out", str(tmp_path / "out"),
                       env={"TVG_TEACHER_KEY": SENTINEL, "TUNELAB_CACHE": str(tmp_path / "cache")}, timeout=120)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out" / "train").exists()  # nothing trained on a failed labelling
    assert_no_secret(r.stdout, r.stderr, dirs=(tmp_path,))


# ------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------
@pytest.mark.model
def test_teacher_vs_gold_end_to_end(tmp_path):
    from tunelab.prompts import load_prompt_spec

    n, dev_n = 16, 16
    # The example config with the short prompt (about 100 instead of 210 tokens a review: half the CPU time);
    # the students train on generate's chat.jsonl and are evaluated with the same prompt.
    cfg = yaml.safe_load(LABEL_CONFIG.read_text(encoding="utf-8"))
    cfg["prompt"] = str(SHORT)
    cfg["data"]["path"] = str(TRAIN)
    cfg["contamination"]["eval_path"] = str(DEV)
    label_config = write_config(tmp_path / "label.yaml", cfg)
    spec = load_prompt_spec(SHORT)
    items = read_jsonl(TRAIN)[:n]
    expected = {it["id"]: OTHER[it["label"]] if k % 4 == 0 else it["label"] for k, it in enumerate(items)}
    # The teacher's answer, by the prompt it is sent: gold, except every 4th text (4 of 16) gets the other label.
    answers = {spec.render(it)[-1]["content"]: expected[it["id"]] for it in items}
    assert len(answers) == n
    seen: list[str] = []
    lock = threading.Lock()

    def teacher(user_message: str) -> str | None:
        with lock:
            seen.append(user_message)
        return answers.get(user_message)

    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {"TVG_TEACHER_KEY": SENTINEL, "TUNELAB_CACHE": str(cache), "NO_COLOR": "1"}
    # Faults on the way: the labels must come through retries unchanged.
    with FakeServer(labels=LABELS, label_fn=teacher, api_key=SENTINEL,
                    fault_cycle=[Fault("429", retry_after=0.05), None, Fault("500"), None, None]) as srv:
        r = run_script("--label-config", str(label_config), "--base-url", srv.url, "--teacher-model", "fake-label",
                       "--api-key-env", "TVG_TEACHER_KEY", "--n", str(n), "--dev-limit", str(dev_n), "--epochs", "1",
                       "--batch-size", "8", "--lr", "1e-3", "--seed", "3", "--threads", "1",  # 2 shared cores
                       "--out", str(out), env=env)
        server = srv.stats()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert server["auth_headers"] == [f"Bearer {SENTINEL}"] and server["faults"]  # the key was used, faults hit

    # The teacher was given the texts only (the gold labels stay out of what is sent).
    texts = read_jsonl(out / "texts.jsonl")
    assert [set(t) for t in texts] == [{"id", "text"}] * n
    assert sorted(set(seen)) == sorted(answers)

    # Teacher labels land in the chat JSONL, in input order, with provenance.
    chat = read_jsonl(out / "teacher" / "chat.jsonl")
    assert len(chat) == n
    for row, it in zip(chat, items):
        assert row["messages"][:-1] == spec.render(it)
        assert row["messages"][-1] == {"role": "assistant", "content": expected[it["id"]]}
        p = row["provenance"]
        assert p["teacher"] == "fake-label" and p["pipeline"] == "label" and p["source"] == "api"
        assert p["prompt_hash"] == str(spec.content_hash()) and p["endpoint"] == srv.url
    data = read_jsonl(out / "teacher" / "data.jsonl")
    assert [d["label"] for d in data] == [expected[it["id"]] for it in items]
    assert "gold_label" not in data[0]  # the teacher's input file had no gold labels

    # The students train on generate's chat.jsonl (same prompt), and on a gold file with the same prompt messages.
    assert s_outputs(out)["teacher_train"] == str(out / "teacher" / "chat.jsonl")
    gold_rows = read_jsonl(out / "gold.jsonl")
    assert [g["messages"][:-1] for g in gold_rows] == [c["messages"][:-1] for c in chat]
    assert [g["messages"][-1]["content"] for g in gold_rows] == [it["label"] for it in items]

    # Agreement: exactly what the teacher was programmed to do.
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    a = s["agreement"]
    assert (a["n"], a["agree"], a["accuracy"]) == (16, 12, 0.75)
    m = [[sum(1 for it in items if it["label"] == g and expected[it["id"]] == t) for t in LABELS] for g in LABELS]
    assert a["confusion"]["labels"] == LABELS and a["confusion"]["matrix"] == m
    gp, tp = sum(m[0]) / n, (m[0][0] + m[1][0]) / n
    pe = gp * tp + (1 - gp) * (1 - tp)
    assert a["kappa"] == round((0.75 - pe) / (1 - pe), 4)
    assert s["n_requested"] == s["n_labelled"] == 16 and s["teacher"]["model"] == "fake-label"
    assert s["teacher_prompt"] == s["student_prompt"] == str(SHORT) and not s["teacher"]["served_bundled_model"]

    # Two adapters, one recipe: same config apart from data and output, different weights.
    rep = {k: json.loads((out / "train" / k / "report.json").read_text(encoding="utf-8")) for k in ("teacher", "gold")}
    cfg_t, cfg_g = (dict(rep[k]["config"]) for k in ("teacher", "gold"))
    for c in (cfg_t, cfg_g):
        c.pop("out")
        c["data"] = {k: v for k, v in c["data"].items() if k != "path"}
    assert cfg_t == cfg_g and cfg_t["train"]["seed"] == 3 and cfg_t["optim"]["lr"] == 1e-3
    assert cfg_t["train"]["epochs"] == 1 and cfg_t["method"] == "lora"
    assert rep["teacher"]["data"]["path"] == str(out / "teacher" / "chat.jsonl")
    assert rep["gold"]["data"]["path"] == str(out / "gold.jsonl")
    assert rep["teacher"]["steps"] == rep["gold"]["steps"] == 2
    import torch
    from safetensors.torch import load_file

    weights = {}
    for k in ("teacher", "gold"):
        adapter = out / "train" / k / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "prompt_spec.yaml").is_file()
        weights[k] = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights["teacher"].keys() == weights["gold"].keys()
    assert any(not torch.equal(weights["teacher"][k], weights["gold"][k]) for k in weights["teacher"])
    from tunelab.models import load_model

    model = load_model(None, adapter=str(out / "train" / "teacher" / "adapter"))  # loads as PEFT
    assert model.score_choices([spec.render(items[0])], LABELS)[0].logprobs

    # Accuracies with intervals, and a paired McNemar recomputed from the per-item results.
    ev = s["eval"]
    assert set(ev) == {"base", "teacher-trained", "gold-trained"}
    results = read_jsonl(out / "eval" / "results.jsonl")
    right = {name: {x["item_id"]: bool(x["correct"]) for x in results if x["model"] == name} for name in ev}
    for name, e in ev.items():
        assert e["n"] == dev_n and e["correct"] == sum(right[name].values())
        assert e["accuracy"] == round(e["correct"] / dev_n, 4) and e["ci"][0] <= e["accuracy"] <= e["ci"][1]
    from scipy.stats import binomtest

    p = s["teacher_vs_gold_students"]
    b = sum(right["teacher-trained"][i] and not right["gold-trained"][i] for i in right["base"])
    c = sum(right["gold-trained"][i] and not right["teacher-trained"][i] for i in right["base"])
    assert (p["a_right_b_wrong"], p["a_wrong_b_right"], p["n"]) == (b, c, dev_n)
    assert 0.0 <= p["mcnemar_p"] <= 1.0
    assert math.isclose(p["mcnemar_p"], binomtest(b, b + c, 0.5).pvalue if b + c else 1.0, abs_tol=1e-6)
    assert s["dev"]["n"] == dev_n

    # The table, and the key nowhere: not in the output, not in any file written (cache included).
    assert "| teacher-trained | 16 teacher labels |" in r.stdout and "agreement with gold 75.0%" in r.stdout
    assert "Cohen's kappa" in r.stdout and "McNemar exact p" in r.stdout
    assert_no_secret(r.stdout, r.stderr, dirs=(out, cache))
    assert "TVG_TEACHER_KEY" in (out / "generate.yaml").read_text(encoding="utf-8")  # the name, not the key
