"""Reproducible evaluations through `tunelab serve`: on a CPU the server computes in float32 unless told
otherwise (bf16 autocast makes a sequence's output depend on its batch), /health and the startup line say how
it computes, and `tunelab eval` against a server that is not deterministic warns in one line."""

from __future__ import annotations

import httpx

from helpers import write_jsonl
from helpers.serve import TINY_KEY


def test_the_default_on_a_cpu_is_float32_and_health_says_so(tiny_model_dir):
    from tunelab.serve.app import build_app
    from tunelab.serve.config import ServeConfig

    serving = build_app(ServeConfig(model=str(tiny_model_dir), device="cpu")).state.serving
    h = serving.health()
    assert serving.lm.autocast_dtype is None
    assert (h.dtype, h.deterministic) == ("float32", True)


def eval_log(tmp_path, url: str, model: str, **model_opts) -> list[str]:
    """The lines an eval of one tiny label task through ``url`` logs."""
    from tunelab.config import EvalConfig, validate_as
    from tunelab.evaluate.runner import EvalRunner

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "items.jsonl", [{"id": "1", "text": "good", "label": "a"}])
    cfg = validate_as(EvalConfig, {
        "name": "precision", "data": {"path": str(data)},
        "variants": {"v": {"instruction": "Answer a or b.", "input_template": "{{ text }}", "layout": "chat",
                           "output": {"type": "label", "labels": ["a", "b"]}}},
        "models": [{"name": "served", "model": f"openai:{model}", "base_url": url + "/v1", **model_opts}],
        "generation": {"max_new_tokens": 2}}, "test")
    lines: list[str] = []
    EvalRunner(cfg, tmp_path, tmp_path / "eval", use_cache=False, log=lines.append).run()
    return lines


def test_eval_warns_when_the_server_is_not_deterministic(tiny_model_dir, tiny_server, tmp_path, monkeypatch):
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    app = build_app(ServeConfig(model=str(tiny_model_dir), dtype="bfloat16", max_tokens_limit=16))
    with ServerThread(app) as srv:
        h = httpx.get(srv.url + "/health", timeout=30).json()
        assert (h["dtype"], h["deterministic"]) == ("bfloat16", False)
        lines = eval_log(tmp_path / "bf16", srv.url, app.state.serving.base_id)
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and "\n" not in warnings[0], lines
    assert "bfloat16" in warnings[0] and "--dtype float32" in warnings[0]
    # a float32 server: no warning
    monkeypatch.setenv("TUNELAB_TEST_TINY_KEY", TINY_KEY)
    lines = eval_log(tmp_path / "fp32", tiny_server.url, tiny_server.app.state.serving.base_id,
                     api_key_env="TUNELAB_TEST_TINY_KEY")
    assert not [ln for ln in lines if ln.startswith("warning:")], lines
