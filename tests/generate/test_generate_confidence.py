"""Label confidence in the label pipeline, end to end through the `tunelab generate` CLI: a fake teacher on 127.0.0.1
sends known logprobs, so every confidence is checked to the number (the normalised top-logprobs form and the
sequence probability); the journal and the cache keep the logprobs; min_confidence drops exactly the rows below it;
balance keeps the most confident rows of each label; agreement with gold of all labels vs the kept ones; a server
without logprobs; bad settings; and `tunelab serve` as the teacher."""

import json
import math

import pytest

from helpers import EXAMPLES, read_jsonl, write_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok
from helpers.fakeserver import FakeServer
from helpers.generate import env_for, run_generate, self_instruct_config, stats, with_overrides
from tunelab.generate.journal import request_key
from tunelab.prompts import load_prompt_spec

SHORT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
FAST = {"backoff_initial_s": 0.02, "backoff_max_s": 0.1, "timeout_s": 5}
L = math.log


def tok(token: str, p: float, top: dict[str, float] | None = None) -> dict:
    """One entry of OpenAI's ``choices[0].logprobs.content``."""
    e = {"token": token, "logprob": L(p), "bytes": list(token.encode())}
    if top is not None:
        e["top_logprobs"] = [{"token": t, "logprob": L(q), "bytes": None} for t, q in top.items()]
    return e


def teacher(table: dict[str, tuple[str, list[dict] | None]], **kw) -> FakeServer:
    """A fake teacher that answers the review ``text`` with ``table[text][0]`` and, when asked for logprobs, sends
    ``table[text][1]``."""
    return FakeServer(answer_fn=lambda _m, km: table[km][0] if km in table else None,
                      logprobs_fn=lambda km, _text: table[km][1] if km in table else None, **kw)


def config(url: str, data, **over) -> dict:
    cfg = {"name": "conf-test", "pipeline": "label", "prompt": str(SHORT), "data": {"path": str(data)},
           "teacher": {"model": "gpt-4o-mini", "base_url": url, "concurrency": 4, **FAST},
           "sampling": {"max_tokens": 8}, "quality": {"dedup": "none"}, "output": {"formats": ["chat"]}}
    return with_overrides(cfg, over)


# Reviews, the teacher's answer and logprobs, the gold label, and the confidence docs/generate.md defines.
CASES = [
    # top_logprobs, first token "Pos" tells the labels apart: P(Pos) / (P(Pos) + P(Neg)); "The" is no label's prefix
    ("a", "정말 최고의 영화", "Positive", [tok("Pos", 0.6, {"Pos": 0.6, "Neg": 0.3, "The": 0.05}), tok("itive", 0.9)],
     "Negative", 0.6 / 0.9),
    # no top_logprobs: the sequence probability exp(sum of logprobs)
    ("b", "시간 낭비", "Negative", [tok("Negative", 0.8)], "Negative", 0.8),
    # the first token is white space (tells no label apart): the sequence probability, 0.5 * 0.9
    ("c", "그냥 그랬다", " Positive", [tok(" ", 0.5, {" ": 0.5, "\n": 0.2}), tok("Positive", 0.9)], "Negative", 0.45),
    # case-insensitive and stripped: " pos" and "POS" count for Positive, " neg" and "Negative" for Negative
    ("d", "배우들 연기가 좋다", "positive", [tok(" pos", 0.7, {" pos": 0.7, "POS": 0.1, " neg": 0.1, "Negative": 0.05}),
                                      tok("itive", 0.99)], "Positive", 0.8 / 0.95),
    # exactly at the threshold of the test below: kept (it is not below)
    ("e", "다시 보고 싶다", "Positive", [tok("Positive", 0.7)], "Positive", 0.7),
]
TABLE = {text: (answer, lps) for _id, text, answer, lps, _gold, _conf in CASES}
EXPECTED = {i: round(c, 6) for i, _t, _a, _l, _g, c in CASES}


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "reviews.jsonl", [{"id": i, "text": t, "label": g} for i, t, _a, _l, g, _c in CASES])


def test_confidence_from_logprobs_is_journaled_cached_and_survives_a_resume(tmp_path, data):
    env = env_for(tmp_path)
    with teacher(TABLE) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, sampling={"logprobs": True}))
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env))
        asked = srv.stats()
    assert asked["logprobs_asked"] == len(CASES) and asked["top_logprobs"] == [5]
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert {r["id"]: r["confidence"] for r in rows} == pytest.approx(EXPECTED, abs=1e-6)
    assert EXPECTED["a"] == 0.666667 and EXPECTED["d"] == 0.842105  # the normalised form, not 0.54 / 0.693
    assert all(r["provenance"]["confidence"] == r["confidence"] for r in rows)
    chat = read_jsonl(tmp_path / "out" / "chat.jsonl")
    assert set(chat[0]) == {"messages", "provenance"}  # chat rows keep their shape
    journal = {e["item"]: e for e in read_jsonl(tmp_path / "out" / "journal.jsonl")}
    assert journal["a"]["logprobs"] == [{"token": "Pos", "logprob": L(0.6), "top": [["Pos", L(0.6)], ["Neg", L(0.3)],
                                                                                    ["The", L(0.05)]]},
                                        {"token": "itive", "logprob": L(0.9)}]
    st = stats(tmp_path / "out")["teacher_labels"]
    assert st["confidence"]["methods"] == {"top_logprobs": 2, "sequence": 3} and st["confidence"]["null"] == 0
    assert st["confidence"]["quantiles"]["min"] == 0.45 and st["confidence"]["quantiles"]["max"] == 0.842105
    assert st["confidence"]["histogram"]["counts"] == [0, 0, 0, 0, 1, 0, 1, 1, 2, 0]

    # Resume with the teacher gone: the outputs are rebuilt from the journal alone, confidences included.
    (tmp_path / "out" / "data.jsonl").unlink()
    ok(run_generate(cfg, "--out", str(tmp_path / "out"), "--no-cache", env=env))
    assert stats(tmp_path / "out")["requests"]["from_journal"] == len(CASES)
    assert read_jsonl(tmp_path / "out" / "data.jsonl") == rows
    # A new folder: from the response cache, with the same confidences.
    ok(run_generate(cfg, "--out", str(tmp_path / "out2"), env=env))
    assert stats(tmp_path / "out2")["requests"]["from_cache"] == len(CASES)
    assert [r["confidence"] for r in read_jsonl(tmp_path / "out2" / "data.jsonl")] == [r["confidence"] for r in rows]


def test_without_logprobs_the_journal_keys_are_those_of_earlier_versions(tmp_path, data):
    """Default settings ask for no logprobs, so a journal or cache written before they existed keeps its keys."""
    spec = load_prompt_spec(SHORT)
    with teacher(TABLE) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data))
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path)))
        assert srv.stats()["logprobs_asked"] == 0
    old_params = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": 0}  # what tunelab 0.1 sent
    want = {request_key(pipeline="label", prompt_hash=str(spec.content_hash()), messages=spec.render({"text": t}),
                        model="gpt-4o-mini", params=old_params, extra={"sample": 0}) for _i, t, *_ in CASES}
    assert {e["key"] for e in read_jsonl(tmp_path / "out" / "journal.jsonl")} == want
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert [r["confidence"] for r in rows] == [None] * len(CASES)


def test_min_confidence_drops_exactly_the_rows_below_it_and_agreement_all_vs_kept(tmp_path, data):
    with teacher(TABLE) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, quality={"min_confidence": 0.7}))
        r = run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path))
        ok(r)
        assert srv.stats()["logprobs_asked"] == len(CASES)  # auto: on, the threshold needs it
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert [(x["id"], x["label"], x["confidence"]) for x in rows] == [
        ("b", "Negative", 0.8), ("d", "Positive", 0.842105), ("e", "Positive", 0.7)]
    assert rows[0]["gold_label"] == "Negative"
    st = stats(tmp_path / "out")
    assert st["kept"] == 3 and st["dropped"]["by_reason"] == {"low_confidence": 2}
    assert [(x["id"], x["confidence"]) for x in st["dropped"]["examples"]["low_confidence"]] == [
        ("a", 0.666667), ("c", 0.45)]
    tl = st["teacher_labels"]
    # a and c are the teacher's mistakes; the threshold removed both
    assert tl["agreement_all"] == {"n": 5, "agree": 3, "rate": 0.6}
    assert tl["agreement_kept"] == {"n": 3, "agree": 3, "rate": 1.0} == st["agreement_with_gold"]
    assert tl["keep_rate"] == 0.6 and tl["labelled"] == 5 and tl["kept"] == 3 and tl["min_confidence"] == 0.7
    assert tl["per_label"] == {"Positive": 2, "Negative": 1} and tl["warning"] is None
    assert "warning" not in r.stderr


BAL = [("n1", "별로", "Negative", 0.6), ("p1", "최고", "Positive", 0.9), ("n2", "최악", "Negative", 0.8),
       ("n3", "지루함", "Negative", 0.6), ("p2", "좋음", "Positive", 0.7)]


def test_balance_equal_keeps_the_most_confident_of_each_label(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t, _l, _p in BAL])
    table = {t: (lab, [tok(lab, p)]) for _i, t, lab, p in BAL}
    with teacher(table) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, quality={"balance": "equal", "dedup": "none"}))
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path)))
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    # Negative 3, Positive 2: two of each; of the Negatives n2 (0.8) and n1 (0.6, before n3's equal 0.6)
    assert [x["id"] for x in rows] == ["n1", "p1", "n2", "p2"]
    st = stats(tmp_path / "out")
    assert st["dropped"]["by_reason"] == {"balance": 1} and st["dropped"]["examples"]["balance"][0]["id"] == "n3"
    assert st["teacher_labels"]["balance_counts"] == {"target": 2, "before": {"Positive": 2, "Negative": 3},
                                                      "after": {"Positive": 2, "Negative": 2}}
    assert st["teacher_labels"]["agreement_all"] is None  # no gold labels


def test_balance_after_the_threshold(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t, _l, _p in BAL])
    table = {t: (lab, [tok(lab, p)]) for _i, t, lab, p in BAL}
    with teacher(table) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, quality={"balance": "equal",
                                                                              "min_confidence": 0.65}))
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path)))
    # The threshold leaves p1 0.9, n2 0.8, p2 0.7: one of each (balancing first would have kept p2 as well).
    assert [x["id"] for x in read_jsonl(tmp_path / "out" / "data.jsonl")] == ["p1", "n2"]
    st = stats(tmp_path / "out")
    assert st["dropped"]["by_reason"] == {"low_confidence": 2, "balance": 1}
    assert st["teacher_labels"]["balance_counts"]["before"] == {"Positive": 2, "Negative": 1}


def test_a_server_without_logprobs_gives_null_confidence_and_one_warning(tmp_path, data):
    env = env_for(tmp_path)
    with teacher({t: (a, None) for t, (a, _l) in TABLE.items()}) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, sampling={"logprobs": True}))
        r = run_generate(cfg, "--out", str(tmp_path / "out"), env=env)
        ok(r)
        assert [x["confidence"] for x in read_jsonl(tmp_path / "out" / "data.jsonl")] == [None] * len(CASES)
        warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and "5 of 5 teacher labels have no confidence (the teacher sent no logprobs" \
            in warnings[0], r.stderr
        tl = stats(tmp_path / "out")["teacher_labels"]
        assert tl["confidence"]["null"] == 5 and tl["confidence"]["quantiles"] is None and tl["warning"]
        # With a threshold every label without a confidence is dropped as no_confidence, and said so.
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, quality={"min_confidence": 0.5}))
        r = run_generate(cfg, "--out", str(tmp_path / "out2"), env=env)
        ok(r)
    st = stats(tmp_path / "out2")
    assert st["kept"] == 0 and st["dropped"]["by_reason"] == {"no_confidence": 5}
    assert r.stderr.count("warning:") == 1 and "dropped as no_confidence" in r.stderr


def test_samples_vote_share_is_the_confidence(tmp_path, data):
    with teacher(TABLE) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", config(srv.url, data, sampling={"temperature": 0.8, "samples": 3}))
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path)))
        assert srv.stats()["logprobs_asked"] == 0  # auto: the votes give the confidence
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert all(r["confidence"] == 1.0 and sum(r["label_votes"].values()) == 3 for r in rows)
    assert stats(tmp_path / "out")["teacher_labels"]["confidence"]["methods"] == {"votes": 5}


@pytest.mark.parametrize("quality, needle", [
    ({"min_confidence": 1.5}, "quality.min_confidence"),
    ({"min_confidence": -0.1}, "quality.min_confidence"),
    ({"balance": "most"}, "quality.balance"),
])
def test_bad_values_are_one_line(tmp_path, data, quality, needle):
    cfg = config("http://127.0.0.1:9/v1", data, quality=quality)
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    key = next(iter(quality))
    line_no = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if key in ln)
    assert_clean_error(run_generate(path, env=env_for(tmp_path)), f"bad.yaml:{line_no}:", needle)


@pytest.mark.parametrize("quality", [{"min_confidence": 0.9}, {"balance": "equal"}])
def test_label_settings_on_another_pipeline_are_one_line(tmp_path, quality):
    path = write_yaml(tmp_path / "si.yaml", self_instruct_config("http://127.0.0.1:9/v1", quality=quality))
    key = next(iter(quality))
    line_no = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if key in ln)
    assert_clean_error(run_generate(path, env=env_for(tmp_path)), f"si.yaml:{line_no}:", f"quality.{key}",
                       "label pipeline")


@pytest.mark.model
def test_tunelab_serve_teacher_sends_confidences(tmp_path):
    """`tunelab serve` (the bundled model) as the teacher: real logprobs over HTTP, confidences in (0, 1]."""
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    app = build_app(ServeConfig(dtype="float32", served_model_name="teacher"))
    with ServerThread(app) as srv:
        cfg = write_yaml(tmp_path / "l.yaml", {
            "name": "serve-conf", "pipeline": "label", "prompt": str(EXAMPLES / "prompts" / "sentiment_binary.yaml"),
            "data": {"path": str(EXAMPLES / "data" / "nsmc_binary_dev_200.jsonl"), "limit": 4},
            "teacher": {"model": "teacher", "base_url": srv.url + "/v1", "concurrency": 4, "timeout_s": 120},
            "sampling": {"max_tokens": 4, "stop": ["\n"], "logprobs": True}, "quality": {"repair": 1}})
        ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path), timeout=300))
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert rows, stats(tmp_path / "out")
    assert all(0 < r["confidence"] <= 1 for r in rows)
    entries = [e for e in read_jsonl(tmp_path / "out" / "journal.jsonl") if e.get("status") == "ok"]
    assert all(e["logprobs"] and all("top" in t for t in e["logprobs"]) for e in entries)
    tl = stats(tmp_path / "out")["teacher_labels"]
    assert tl["confidence"]["null"] == 0 and sum(tl["confidence"]["methods"].values()) == len(rows)


def test_batch_api_requests_and_ingests_logprobs(tmp_path, data):
    cfg = write_yaml(tmp_path / "l.yaml", config("http://127.0.0.1:9/v1", data, quality={"min_confidence": 0.7}))
    env = env_for(tmp_path, key=None)
    out = tmp_path / "out"
    ok(run_generate(cfg, "--out", str(out), "--batch-api", env=env))
    reqs = read_jsonl(out / "batch_input.jsonl")
    assert all(r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 5 for r in reqs)
    lines = []
    for r in reqs:
        answer, content = TABLE[r["body"]["messages"][-1]["content"]]
        lines.append({"custom_id": r["custom_id"], "error": None, "response": {"status_code": 200, "body": {
            "model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 2},
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": content},
                         "message": {"role": "assistant", "content": answer}}]}}})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ok(run_generate(cfg, "--out", str(out), "--batch-api", "--batch-results", str(results), env=env))
    assert [(x["id"], x["confidence"]) for x in read_jsonl(out / "data.jsonl")] == [
        ("b", 0.8), ("d", 0.842105), ("e", 0.7)]
