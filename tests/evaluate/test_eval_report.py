import re

import numpy as np

from helpers.fakeserver import FakeServer
from helpers.pages import EVIL, assert_self_contained, needs_chromium, screenshot
from tunelab.config import EvalConfig, validate_as
from tunelab.data.io import write_jsonl
from tunelab.evaluate.runner import EvalRunner
from tunelab.evaluate.page import render as render_report, write as write_report

LABELS = ["긍정", "부정", "중립"]
MARKUP = "<b>markup</b> & 한국어"  # a model name: shown escaped wherever it appears


def run_eval(tmp_path, items: list[dict], variants: dict[str, dict], models: list[str], answer, **generation):
    """The real eval runner over ``items`` against the fake OpenAI-compatible server on 127.0.0.1, whose answer to
    each request is ``answer(model, user message)``: the report's inputs come from the producer itself."""
    data = tmp_path / "items.jsonl"
    write_jsonl(data, items)
    with FakeServer(answer_fn=answer) as srv:
        cfg = validate_as(EvalConfig, {
            "name": "nsmc test", "data": {"path": str(data), "name": "nsmc"}, "variants": variants,
            "models": [{"name": m, "model": "openai:fake-echo", "base_url": srv.url} for m in models],
            "generation": generation}, "test")
        return EvalRunner(cfg, tmp_path, tmp_path / "eval", use_cache=False).run()


def _variant(name: str, output: dict, **extra) -> dict:
    return {"instruction": f"{name} 지시문: 분류하세요.", "input_template": f"[{name}] {{{{ text }}}}",
            "layout": "chat", "output": output, **extra}


def _planned(key: str) -> tuple[str, str]:
    """The user message '... [variant] text' -> (variant, text)."""
    m = re.search(r"\[(\w+)\] (.*)\Z", key, re.S)
    return m.group(1), m.group(2)


def label_run(tmp_path):
    """80 reviews, three prompts that get 45%, 85% and 60% right; item 0 is the malicious one, wrong everywhere."""
    rng = np.random.default_rng(0)
    gold = [str(g) for g in rng.choice(LABELS, 80)]
    items = [{"id": str(i), "text": EVIL if i == 0 else f"영화 리뷰 {i}", "label": g} for i, g in enumerate(gold)]
    plan: dict[tuple[str, str], str] = {}
    for variant, p_ok in (("zero_shot", 0.45), ("few_shot", 0.85), ("cot", 0.6)):
        for it, g in zip(items, gold):
            ok = it["id"] != "0" and rng.random() < p_ok
            plan[variant, it["text"]] = g if ok else (f"I cannot say {EVIL}" if rng.random() < 0.2 else
                                                      str(rng.choice([x for x in LABELS if x != g])))
    variants = {v: _variant(v, {"type": "label", "labels": LABELS}) for v in ("zero_shot", "few_shot", "cot")}
    return run_eval(tmp_path, items, variants, ["smollm2"], lambda model, key: plan[_planned(key)])


def test_label_report(tmp_path):
    summary, rows = label_run(tmp_path)
    html = render_report(summary, rows, title="NSMC <prompts>")
    _check_common(html, ["zero_shot", "few_shot", "cot"])
    assert "<title>NSMC &lt;prompts&gt;</title>" in html
    assert "Best: few_shot" in html
    assert re.search(r"few_shot beats zero_shot by \+\d+\.\d points \(p(=|&lt;)[0-9.]+, significant\)", html)
    assert html.count("<svg") == 1 + 3  # the bar chart and one confusion matrix per cell
    assert "Confusion matrices" in html and "(invalid)" in html
    assert "중립" in html and "<details" in html
    assert "item 0 &mdash; 3 of 3 cells wrong" in html  # the worst example comes first
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.split("item 0 &mdash;")[1]  # its input, escaped


def test_number_report_with_repeats(tmp_path):
    """Sampled three times: the runner's pass rates and flaky-item counts reach the report."""
    rng = np.random.default_rng(1)
    items, right = [], {}
    for i in range(40):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        items.append({"id": str(i), "text": f"문제 {i}: {a} 더하기 {b}?", "answer": a + b})
        right[items[-1]["text"]] = {"plain": rng.random() < 0.5, "step_by_step": rng.random() < 0.7}
    calls: dict[str, int] = {}

    def answer(model: str, key: str) -> str:
        variant, text = _planned(key)
        n = calls[key] = calls.get(key, 0) + 1
        gold = next(it["answer"] for it in items if it["text"] == text)
        ok = right[text][variant] and (n != 2 or variant == "plain")  # step_by_step's second sample: flaky
        return f"The answer is {gold if ok else gold + 1}."

    variants = {v: _variant(v, {"type": "number"}) for v in ("plain", "step_by_step")}
    summary, rows = run_eval(tmp_path, items, variants, ["smollm2"], answer, samples=3, temperature=0.7)
    path = write_report(tmp_path / "out" / "report.html", summary, rows, title="math")
    html = path.read_text(encoding="utf-8")
    _check_common(html, ["plain", "step_by_step"], evil=False)
    assert "Confusion matrices" not in html
    assert "flaky items" in html
    step = next(c for c in summary.cells if c.variant == "step_by_step")
    assert step.n_samples == 3 and step.flaky_items == sum(r["step_by_step"] for r in right.values())
    best = "step_by_step" if step.metrics["accuracy"].value >= summary.cells[0].metrics["accuracy"].value else "plain"
    assert f"Best: {best}" in html


def test_report_without_gold_and_several_models(tmp_path):
    """A json task without gold answers on two models: no best cell, cells named ``variant @ model``."""
    items = [{"id": str(i), "text": f"이름을 뽑아라 {i}"} for i in range(20)]

    def answer(model: str, key: str) -> str:
        variant, text = _planned(key)
        i = int(text.rsplit(" ", 1)[1])
        if variant == "json_b":
            return '{"name": "김"}'
        return '{"name": "x"}' if i % 4 else f"no JSON here {EVIL}"

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    variants = {"json_a": _variant("json_a", {"type": "json", "schema": schema}),
                "json_b": _variant("json_b", {"type": "json", "schema": schema})}
    summary, rows = run_eval(tmp_path, items, variants, ["m1", MARKUP], answer)
    assert summary.best is None
    html = render_report(summary, rows, title="json")
    _check_common(html, ["json_a", "json_b"])
    assert "No gold answers" in html
    escaped = MARKUP.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert "json_a @ m1" in html and f"json_b @ {escaped}" in html
    assert "1 of 2 cells did not comply" not in html and "2 of 4 cells did not comply" in html
    assert "{&#34;name&#34;: &#34;김&#34;}" in html  # JSON predictions shown as JSON, escaped


def _check_common(html: str, variants: list[str], evil: bool = True) -> None:
    assert_self_contained(html)  # the evil script escaped everywhere, and the report has no scripts of its own
    if evil:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<svg" in html
    for v in variants:
        assert v in html


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    summary, rows = label_run(tmp_path)
    path = write_report(tmp_path / "report.html", summary, rows, title="chromium")
    data = screenshot(path, tmp_path / "shot.png", tmp_path / "profile")
    assert len(data) > 20_000  # a rendered page with tables and charts, not a blank image
