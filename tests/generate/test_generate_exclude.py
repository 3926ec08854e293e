"""``data.exclude`` of `tunelab generate`: inputs whose prompt fields equal a record of a gold training set or an
eval set are never sent to the teacher (a teacher label must not stand beside or instead of a gold one, nor an eval
review leak into training); ``limit`` counts the inputs left; the count is in stats.json; bad exclude files are one
line; and `tunelab run` adds data.train and data.eval to it by itself (generate.exclude_gold)."""

from __future__ import annotations

import json

from helpers import EXAMPLES, read_jsonl, write_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok, run_cli
from helpers.fakeserver import FakeServer
from helpers.generate import env_for, run_generate
from helpers.run import DEV, TRAIN, experiment, run_env

SHORT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
FAST = {"timeout_s": 5, "backoff_initial_s": 0.02, "backoff_max_s": 0.1}


def config(url: str, data, **data_over) -> dict:
    return {"name": "exclude-test", "pipeline": "label", "prompt": str(SHORT), "data": {"path": str(data), **data_over},
            "teacher": {"model": "fake-label", "base_url": url, "concurrency": 4, **FAST},
            "sampling": {"max_tokens": 8}, "quality": {"dedup": "none"}, "output": {"formats": ["chat"]}}


def unlabelled(tmp_path, gold: list[dict], new: list[str]):
    """Inputs: gold reviews under other ids (as an unlabelled dump holds them, without labels) among new texts."""
    rows = [{"id": f"u{k}", "text": t} for k, t in enumerate(new)]
    for k, g in enumerate(gold):
        rows.insert(2 * k + 1, {"id": f"dup{k}", "text": g["text"]})
    return write_jsonl(tmp_path / "unlabelled.jsonl", rows)


def test_gold_texts_are_never_sent_and_limit_counts_what_is_left(tmp_path):
    gold = read_jsonl(TRAIN)[:3]
    new = ["처음 보는 리뷰 하나", "두 번째 새 리뷰", "세 번째", "네 번째 리뷰", "다섯"]
    data = unlabelled(tmp_path, gold, new)
    train = write_jsonl(tmp_path / "gold.jsonl", gold)
    env = env_for(tmp_path)
    with FakeServer(labels=["Positive", "Negative"]) as srv:
        cfg = write_yaml(tmp_path / "g.yaml", config(srv.url, data, exclude=["gold.jsonl"]))  # relative to the config
        p = ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env))
        sent = srv.stats()["completions"]
        # without the exclusion the same file sends every input (the test can tell the two apart)
        cfg2 = write_yaml(tmp_path / "g2.yaml", config(srv.url, data))
        ok(run_generate(cfg2, "--out", str(tmp_path / "out2"), "--no-cache", env=env))
        assert srv.stats()["completions"] - sent == len(new) + len(gold)
        # limit: the first 4 inputs that are not gold, however many gold ones lie between them
        cfg3 = write_yaml(tmp_path / "g3.yaml", config(srv.url, data, exclude=[str(train)], limit=4))
        ok(run_generate(cfg3, "--out", str(tmp_path / "out3"), "--no-cache", env=env))
    assert sent == len(new)
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"u{k}" for k in range(len(new)))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["excluded_inputs"] == 3 and stats["inputs"] == len(new)
    assert "excluded" in p.stdout and "3 inputs found in data.exclude" in p.stdout
    assert json.loads((tmp_path / "out2" / "stats.json").read_text()).get("excluded_inputs") is None
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out3" / "data.jsonl")) == ["u0", "u1", "u2", "u3"]


def test_bad_exclude_files_are_one_line(tmp_path):
    gold = read_jsonl(TRAIN)[:2]
    data = unlabelled(tmp_path, gold, ["새 리뷰"])
    env = env_for(tmp_path)
    with FakeServer(labels=["Positive", "Negative"]) as srv:
        missing = write_yaml(tmp_path / "m.yaml", config(srv.url, data, exclude=["nope.jsonl"]))
        assert_clean_error(run_generate(missing, "--out", str(tmp_path / "o1"), env=env), "data.exclude",
                           "no such file", "nope.jsonl")
        no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "review": "b"}])
        bad = write_yaml(tmp_path / "b.yaml", config(srv.url, data, exclude=[str(no_text)]))
        assert_clean_error(run_generate(bad, "--out", str(tmp_path / "o2"), env=env), f"{no_text}:2", "'text'")
        everything = write_jsonl(tmp_path / "all.jsonl", read_jsonl(data))
        allx = write_yaml(tmp_path / "a.yaml", config(srv.url, data, exclude=[str(everything)]))
        assert_clean_error(run_generate(allx, "--out", str(tmp_path / "o3"), env=env),
                           "every input is in data.exclude", "3 of them")
        assert srv.stats()["completions"] == 0
    assert not (tmp_path / "o1" / "data.jsonl").exists()


def test_run_excludes_the_experiments_gold_and_eval_texts(tiny_model_dir, tmp_path):
    gold, dev = read_jsonl(TRAIN)[:2], read_jsonl(DEV)[:2]
    new = ["처음 보는 리뷰 하나", "두 번째 새 리뷰", "세 번째"]
    data = unlabelled(tmp_path, gold + dev, new)
    with FakeServer(labels=["Positive", "Negative"]) as srv:
        gen = {"config": config(srv.url, data)}
        exp = experiment(tiny_model_dir, generate=gen)
        out = tmp_path / "out"
        ok(run_cli("run", write_yaml(tmp_path / "exp.yaml", exp), "--out", out, "--only", "generate",
                   env=run_env(tmp_path)))
        assert srv.stats()["completions"] == len(new)
        assert "tunelab run: tiny" in (out / "report.html").read_text()  # the generate stage alone has a page too
        resolved = (out / "configs" / "generate.yaml").read_text()
        assert str(TRAIN.resolve()) in resolved and str(DEV.resolve()) in resolved
        assert sorted(r["id"] for r in read_jsonl(out / "generate" / "data.jsonl")) == ["u0", "u1", "u2"]
        # exclude_gold: false sends them all (the teacher relabelling the gold reviews on purpose)
        gen["exclude_gold"] = False
        ok(run_cli("run", write_yaml(tmp_path / "exp2.yaml", exp), "--out", tmp_path / "out2", "--only", "generate",
                   env=run_env(tmp_path)))
        assert len(read_jsonl(tmp_path / "out2" / "generate" / "data.jsonl")) == len(new) + 4
