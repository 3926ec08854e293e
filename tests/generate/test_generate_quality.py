"""Quality gates, duplicate filters, task parsing, contamination and Batch API files."""

import json
from types import SimpleNamespace

from tunelab.generate.resolver import Request
from tunelab.generate.export import contamination_check, ingest_batch_results, write_batch_input
from tunelab.generate.journal import Journal
from tunelab.generate.pipelines import parse_tasks
from tunelab.generate.quality import (Drops, ExactDedup, MinHashDedup, RougeDedup, instruction_problem,
                                      json_schema_errors, reasoning_agrees, rouge_l, tokens)


def test_rouge_l_matches_hand_computation():
    a, b = tokens("the cat sat on the mat"), tokens("the cat lay on the mat")
    # LCS = the cat on the mat = 5; P = R = 5/6
    assert abs(rouge_l(a, b) - 5 / 6) < 1e-9
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0
    assert tokens("배터리는 평범하지만 디자인은 마음에 든다.") == ["배터리는", "평범하지만", "디자인은", "마음에", "든다"]


def test_rouge_dedup_as_in_self_instruct():
    d = RougeDedup(0.7)
    assert d.check("Write a short poem about the sea.") is None
    hit = d.check("Write a short poem about the sea and the sky.")
    assert hit is not None and hit[0] == 0 and hit[1] >= 0.7
    assert d.check("Classify the sentiment of this movie review.") is None


def test_exact_and_minhash_dedup():
    e = ExactDedup()
    assert e.check("Hello,  World!") is None and e.check("hello world") == 0
    m = MinHashDedup(0.7)
    long = "one two three four five six seven eight nine ten eleven twelve"
    assert m.check(long) is None
    hit = m.check(long + " thirteen")  # 12 of 13 words shared: found as a near copy of text 0
    assert hit is not None and hit[0] == 0 and 0.7 <= hit[1] < 1.0
    assert m.check("completely unrelated words make a different sentence here today") is None


def test_reasoning_agreement():
    assert reasoning_agrees("3 + 4 = 7, then 7 * 2 = 14.\nThe answer is 14.", 14)
    assert not reasoning_agrees("3 + 4 = 7, then 7 * 2 = 14.\nThe answer is 15.", 15)
    assert reasoning_agrees("It costs 1,200 dollars.\n#### 1200", "1200")
    assert reasoning_agrees("no numbers in the reasoning\n#### 5", 5)
    assert reasoning_agrees("5 + 5 = 10\nAnswer: 10 apples", 10, answer_prefix="Answer:")
    assert not reasoning_agrees("5 + 5 = 10\n정답: 11", 11, answer_prefix="정답:")


def test_instruction_filters():
    kw = dict(min_words=3, max_words=20, blacklist=["image", "draw"])
    assert instruction_problem("Describe the image below.", **kw) == "blacklisted_word"
    assert instruction_problem("Too short", **kw) == "too_short"
    assert instruction_problem(" ".join(["word"] * 21), **kw) == "too_long"
    assert instruction_problem("- List three fruits please.", **kw) == "starts_with_punctuation"
    assert instruction_problem("List three fruits that are red.", **kw) is None
    assert instruction_problem("Imagine a city by the sea.", **kw) is None  # "image" only as a whole word


def test_json_schema_errors():
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    assert json_schema_errors({"a": 1}, schema) is None
    assert "a" in json_schema_errors({"a": "x"}, schema)
    assert "required" in json_schema_errors({}, schema)


def test_parse_tasks_tolerates_fences_and_prose():
    body = [{"instruction": "Do X.", "input": "", "output": "ok"}]
    assert parse_tasks(json.dumps(body))[0] == body
    assert parse_tasks("Sure! Here they are:\n```json\n" + json.dumps(body) + "\n```")[0] == body
    assert parse_tasks(json.dumps({"tasks": body}))[0] == body
    assert parse_tasks("not json at all")[0] is None


def test_drops_count_and_keep_examples():
    d = Drops(max_examples=2)
    for i in range(5):
        d.add("parse_error", id=i)
    d.add("duplicate", id=9)
    out = d.as_dict()
    assert out["total"] == 6 and out["by_reason"] == {"parse_error": 5, "duplicate": 1}
    assert len(out["examples"]["parse_error"]) == 2


def test_contamination_exact_and_ngram(tmp_path):
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"text": "이 영화 정말 최고예요!"},
        {"question": "Tom has 3 apples and buys 4 more apples at the shop. How many apples does he have?"}]) + "\n")
    rows = [SimpleNamespace(texts=[t], data={"id": i}) for i, t in enumerate([
        "이 영화 정말 최고예요",  # exact after normalisation
        "Sara has 3 apples and buys 4 more apples at the shop. How many pears?",  # shares an 8-gram
        "A completely different sentence."])]
    rep, hits = contamination_check(rows, ev, fields=["text", "question"], n=8)
    assert hits == {0, 1} and rep["exact"] == 1 and rep["ngram"] == 1 and rep["eval_items"] == 2


def test_batch_input_and_results_roundtrip(tmp_path):
    reqs = [Request(key=f"k{i}", messages=[{"role": "user", "content": f"q{i}"}],
                    params={"temperature": 0.0, "max_tokens": 5}, item=str(i)) for i in range(3)]
    [path] = write_batch_input(tmp_path, reqs, "gpt-4o-mini")
    lines = [json.loads(x) for x in open(path)]
    assert lines[0] == {"custom_id": "k0", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q0"}],
                                 "temperature": 0.0, "max_tokens": 5}}
    results = tmp_path / "results.jsonl"
    ok = lambda cid, text: {"id": "batch_req_1", "custom_id": cid, "error": None, "response": {  # noqa: E731
        "status_code": 200, "request_id": "r", "body": {
            "model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "finish_reason": "stop",
                                                            "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1}}}}
    results.write_text("\n".join(json.dumps(x) for x in [
        ok("k0", "A"), ok("k1", "B"),
        {"id": "batch_req_3", "custom_id": "k2", "response": None,
         "error": {"code": "server_error", "message": "boom"}}]) + "\n")
    with Journal(tmp_path / "j.jsonl") as j:
        counts = ingest_batch_results([results], j)
        assert counts == {"ok": 2, "error": 1, "already_done": 0}
        assert j.done("k0")["text"] == "A" and j.done("k0")["source"] == "batch" and j.done("k2") is None
        assert ingest_batch_results([results], j)["already_done"] == 2
