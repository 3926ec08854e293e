"""`tunelab generate` end to end, as a user runs it: a real subprocess against a real server on 127.0.0.1.

These use the self-instruct pipeline (it needs no PromptSpec); label and respond are in
test_generate_pipelines.py.
"""

import json
from pathlib import Path

import pytest

from helpers import read_jsonl, write_yaml
from helpers.cli import assert_clean_error, ok
from helpers.fakeserver import FakeServer, Fault
from helpers.generate import SENTINEL, assert_no_secret, env_for, kill_and_rerun, run_generate, self_instruct_config, \
    stats
from helpers.processes import free_port


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "provenance"} for r in rows]


@pytest.fixture(scope="module")
def server():
    with FakeServer(latency=0.02) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """An uninterrupted, fault-free run: what every resumed, faulty or batch run must reproduce exactly."""
    d = tmp_path_factory.mktemp("reference")
    cfg = write_yaml(d / "si.yaml", self_instruct_config(server.url))
    r = run_generate(cfg, "--out", str(d / "out"), env=env_for(d))
    ok(r)
    return read_jsonl(d / "out" / "data.jsonl"), stats(d / "out")


def test_self_instruct_end_to_end(reference):
    rows, st = reference
    assert len(rows) == 30 == st["kept"]
    instr = [r["instruction"] for r in rows]
    assert len(set(instr)) == len(instr)
    by = st["dropped"]["by_reason"]
    assert by.get("near_duplicate", 0) + by.get("duplicate", 0) > 0 and by.get("blacklisted_word", 0) > 0
    assert not any("picture" in i.lower() for i in instr)
    assert st["candidates"] == st["kept"] + st["dropped"]["total"]
    out = Path(st["outputs"]["data"]).parent
    chat = read_jsonl(out / "chat.jsonl")
    alpaca = json.loads((out / "alpaca.json").read_text())
    assert len(chat) == len(alpaca) == 30
    assert [m["role"] for m in chat[0]["messages"]] == ["user", "assistant"]
    assert alpaca[0]["instruction"] == rows[0]["instruction"] and alpaca[0]["output"] == rows[0]["output"]
    prov = chat[0]["provenance"]
    assert prov["teacher"] == "gpt-4o-mini" and prov["prompt_hash"] and prov["time"] and prov["source"] == "api"
    assert prov["sampling"]["temperature"] == 0.7
    assert st["tokens"]["prompt"] > 0 and st["cost_usd"] > 0 and st["latency_ms"]["n"] > 0


def test_faults_do_not_change_the_data(reference, tmp_path):
    # Dealt round-robin to distinct prompts (None: no fault), so every kind occurs.
    cycle = [Fault("429", retry_after=0.05), Fault("500", attempts=2), None, Fault("malformed"),
             Fault("hang", hang_s=10), Fault("disconnect"), Fault("429", attempts=2), None]
    with FakeServer(fault_cycle=cycle) as srv:
        cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(srv.url, teacher={"timeout_s": 0.5}))
        r = run_generate(cfg, "--out", str(tmp_path / "out"), env=env_for(tmp_path))
        ok(r)
        assert srv.stats()["early_retries"] == 0
        assert set(srv.stats()["faults"]) == {"429", "500", "malformed", "hang", "disconnect"}
    st = stats(tmp_path / "out")
    assert sum(st["requests"]["retries"].values()) > 0
    assert strip(read_jsonl(tmp_path / "out" / "data.jsonl")) == strip(reference[0])


def test_sigkill_then_rerun_loses_and_duplicates_nothing(reference, tmp_path):
    with FakeServer(latency=0.15) as srv:
        cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(srv.url, teacher={"concurrency": 2}))
        out = tmp_path / "out"
        done_before = kill_and_rerun(cfg, out, env_for(tmp_path), entries=5)
        served = srv.stats()["completions"]
    st = stats(out)
    assert st["requests"]["from_journal"] == done_before
    keys = [e["key"] for e in read_jsonl(out / "journal.jsonl")]
    assert len(keys) == len(set(keys)), "a request was journaled twice"
    rows = read_jsonl(out / "data.jsonl")
    assert strip(rows) == strip(reference[0])  # 0 lost, 0 duplicated, same order
    # At most the requests in flight at the kill were asked twice.
    assert served <= reference[1]["requests"]["answers_used"] + 2


def test_rerun_is_free_and_cache_serves_a_new_folder(server, tmp_path):
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(server.url))
    env = env_for(tmp_path)
    ok(run_generate(cfg, "--out", str(tmp_path / "a"), env=env))
    before = server.stats()["requests"]
    r = run_generate(cfg, "--out", str(tmp_path / "a"), env=env)
    ok(r)
    assert stats(tmp_path / "a")["requests"]["fetched"] == 0
    r = run_generate(cfg, "--out", str(tmp_path / "b"), env=env)
    ok(r)
    assert server.stats()["requests"] == before
    sb = stats(tmp_path / "b")
    assert sb["requests"]["from_cache"] == sb["requests"]["answers_used"] > 0
    assert sb["cost_usd"] == 0
    assert strip(read_jsonl(tmp_path / "a" / "data.jsonl")) == strip(read_jsonl(tmp_path / "b" / "data.jsonl"))


def test_budget_stops_cleanly_and_rerun_continues(reference, server, tmp_path):
    env = env_for(tmp_path)
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(server.url, budget={"max_requests": 5}))
    r = run_generate(cfg, "--out", str(tmp_path / "out"), env=env)
    ok(r)
    assert "stopped early: budget.max_requests (5)" in r.stdout
    st = stats(tmp_path / "out")
    assert st["budget"]["spent_requests"] == 5 and st["pending"] > 0 and st["stopped"]
    write_yaml(cfg, self_instruct_config(server.url, budget={"max_requests": 1000}))
    ok(run_generate(cfg, "--out", str(tmp_path / "out"), env=env))
    assert strip(read_jsonl(tmp_path / "out" / "data.jsonl")) == strip(reference[0])


def test_cost_budget_needs_a_price(server, tmp_path):
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(
        server.url, teacher={"model": "my-local-model"}, budget={"max_cost_usd": 1.0}))
    assert_clean_error(run_generate(cfg, env=env_for(tmp_path)), "teacher.price")


def test_batch_api_roundtrip_equals_online(reference, tmp_path):
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config("http://127.0.0.1:9/v1"))
    env = env_for(tmp_path, key=None)  # the batch files are written and read without any key or server
    out = tmp_path / "out"
    answerer = FakeServer()
    args: list[str] = []
    for rnd in range(20):
        r = run_generate(cfg, "--out", str(out), "--batch-api", *args, env=env)
        ok(r)
        batch = out / "batch_input.jsonl"
        if not batch.exists():
            break
        results = tmp_path / f"results_{rnd}.jsonl"
        lines = []
        for req in read_jsonl(batch):
            assert req["url"] == "/v1/chat/completions" and req["body"]["model"] == "gpt-4o-mini"
            text = answerer.answer(req["body"]["model"], req["body"]["messages"])
            lines.append({"id": f"batch_req_{len(lines)}", "custom_id": req["custom_id"], "error": None,
                          "response": {"status_code": 200, "request_id": "x", "body": {
                              "id": "c", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 100, "completion_tokens": 50}}}})
        results.write_text("".join(json.dumps(x) + "\n" for x in lines))
        args = ["--batch-results", str(results)]
    else:
        pytest.fail("batch rounds never finished")
    rows = read_jsonl(out / "data.jsonl")
    assert strip(rows) == strip(reference[0])
    assert {r["provenance"]["source"] for r in rows} == {"batch"}
    st = stats(out)
    assert st["cost_usd"] == pytest.approx(st["requests"]["answers_used"] * (100 * 0.15 + 50 * 0.6) / 1e6 * 0.5)


def test_batch_file_respects_the_budget(tmp_path):
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config("http://127.0.0.1:9/v1", budget={"max_requests": 2}))
    r = run_generate(cfg, "--out", str(tmp_path / "out"), "--batch-api", env=env_for(tmp_path, key=None))
    ok(r)
    assert len(read_jsonl(tmp_path / "out" / "batch_input.jsonl")) == 2
    assert "stopped early: budget.max_requests (2)" in r.stdout


def test_dry_run_sends_nothing(server, tmp_path):
    cfg = write_yaml(tmp_path / "si.yaml", self_instruct_config(server.url))
    before = server.stats()["requests"]
    r = run_generate(cfg, "--dry-run", "--out", str(tmp_path / "out"), env=env_for(tmp_path))
    ok(r)
    assert "requests to send: 4" in r.stdout and "cost at most" in r.stdout
    assert server.stats()["requests"] == before


# ------------------------------------------------------------------------------------------------------
# the API key
# ------------------------------------------------------------------------------------------------------
def test_key_from_named_env_var_or_file_never_leaks(tmp_path):
    with FakeServer(api_key=SENTINEL) as srv:
        # a named environment variable
        cfg = write_yaml(tmp_path / "a.yaml", self_instruct_config(srv.url, teacher={"api_key_env": "MY_TEACHER_KEY"}))
        env = {**env_for(tmp_path, key=None), "MY_TEACHER_KEY": SENTINEL}
        r1 = run_generate(cfg, "--out", str(tmp_path / "out_env"), env=env)
        ok(r1)
        # a key file (relative to the config)
        (tmp_path / "teacher.key").write_text(SENTINEL + "\n")
        cfg2 = write_yaml(tmp_path / "b.yaml", self_instruct_config(srv.url, teacher={"api_key_file": "teacher.key"}))
        r2 = run_generate(cfg2, "--out", str(tmp_path / "out_file"), "--no-cache", env=env_for(tmp_path, key=None))
        ok(r2)
        assert srv.stats()["auth_headers"] == [f"Bearer {SENTINEL}"]  # the key was used ...
    # ... and a server that rejects it and echoes it back
    with FakeServer(api_key="something-else") as srv:
        cfg3 = write_yaml(tmp_path / "c.yaml", self_instruct_config(srv.url))
        r3 = run_generate(cfg3, "--out", str(tmp_path / "out_401"), "--no-cache", env=env_for(tmp_path))
        assert_clean_error(r3, "rejected the API key", "401")
    assert_no_secret(r1.stdout, r1.stderr, r2.stdout, r2.stderr, r3.stdout, r3.stderr,
                     dirs=(tmp_path / "out_env", tmp_path / "out_file", tmp_path / "out_401", tmp_path / "cache"))


def test_key_in_config_is_refused(tmp_path):
    cfg = write_yaml(tmp_path / "k.yaml", self_instruct_config("http://127.0.0.1:9/v1",
                                                               teacher={"api_key": SENTINEL}))
    line = assert_clean_error(run_generate(cfg, env=env_for(tmp_path)), "never put the API key", "k.yaml:")
    assert SENTINEL not in line


def test_missing_key_without_local_server(tmp_path):
    cfg = self_instruct_config("x")
    del cfg["teacher"]["base_url"]
    path = write_yaml(tmp_path / "k.yaml", cfg)
    assert_clean_error(run_generate(path, "--out", str(tmp_path / "o"), env=env_for(tmp_path, key=None)),
                       "OPENAI_API_KEY", "k.yaml:")


# ------------------------------------------------------------------------------------------------------
# bad input: one line `error: file:line: ...`, exit 2, no traceback, nothing lost
# ------------------------------------------------------------------------------------------------------
def test_missing_config_file(tmp_path):
    assert_clean_error(run_generate(tmp_path / "nope.yaml", env=env_for(tmp_path)), "nope.yaml")


def test_unknown_config_field_names_file_line_and_field(tmp_path):
    cfg = self_instruct_config("http://127.0.0.1:9/v1")
    cfg["teacher"]["concurency"] = 3
    path = write_yaml(tmp_path / "u.yaml", cfg)
    line_no = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "concurency" in ln)
    assert_clean_error(run_generate(path, env=env_for(tmp_path)), f"u.yaml:{line_no}:", "teacher.concurency",
                       "unknown field")


def test_malformed_seed_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}\n'
                     '{"instruction": oops}\n')
    cfg = write_yaml(tmp_path / "s.yaml", self_instruct_config("http://127.0.0.1:9/v1",
                                                               self_instruct={"seed_tasks": str(seeds)}))
    assert_clean_error(run_generate(cfg, env=env_for(tmp_path)), f"{seeds}:2", "malformed JSON")


def test_missing_seed_file(tmp_path):
    cfg = write_yaml(tmp_path / "s.yaml", self_instruct_config(
        "http://127.0.0.1:9/v1", self_instruct={"seed_tasks": str(tmp_path / "none.jsonl")}))
    assert_clean_error(run_generate(cfg, env=env_for(tmp_path)), "none.jsonl")


def test_unreachable_endpoint_keeps_what_was_written(server, tmp_path):
    env = env_for(tmp_path)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "s.yaml", self_instruct_config(server.url, budget={"max_requests": 6}))
    ok(run_generate(cfg, "--out", str(out), env=env))
    journal_before = (out / "journal.jsonl").read_bytes()
    data_before = (out / "data.jsonl").read_bytes()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = write_yaml(tmp_path / "s.yaml", self_instruct_config(dead))
    line_no = next(i for i, ln in enumerate(cfg.read_text().splitlines(), 1) if "base_url" in ln)
    r = run_generate(cfg, "--out", str(out), "--no-cache", env=env)
    assert_clean_error(r, f"s.yaml:{line_no}:", "cannot reach")
    assert (out / "journal.jsonl").read_bytes() == journal_before
    assert (out / "data.jsonl").read_bytes() == data_before

