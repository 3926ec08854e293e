"""The `tunelab run` report: one self-contained page (no network, no scripts, hostile text escaped), and — in
headless Chromium driven over WebDriver (Debian `chromium` + `chromium-driver`) — charts that render with a
real size, no console errors, no resource fetched, and a screenshot.

Set TUNELAB_SCREENSHOT_DIR to also keep the screenshot (and the report) there."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import read_jsonl, write_jsonl, write_yaml
from helpers.cli import ok, run_cli
from helpers.pages import EVIL, PNG, WebDriver, assert_self_contained, needs_webdriver
from helpers.run import DEV, experiment, run_env


@pytest.fixture(scope="module")
def report_run(tiny_model_dir, tmp_path_factory):
    """A tiny run whose eval data holds a review with markup in it (it must show up escaped)."""
    d = tmp_path_factory.mktemp("report")
    rows = read_jsonl(DEV)[:16]
    rows[0]["text"] = f"{EVIL} 최고의 영화 & <b>bold</b>"
    data = write_jsonl(d / "dev.jsonl", rows)
    exp = experiment(tiny_model_dir, description=f"a description with {EVIL}", tracking=["mlflow", "tensorboard"])
    exp["data"]["eval"] = str(data)
    path = write_yaml(d / "exp.yaml", exp)
    out = d / "out"
    ok(run_cli("run", path, "--out", out, env=run_env(d, MLFLOW_TRACKING_URI=(d / "mlruns").as_uri())))
    return out


def test_tracking_is_optional(report_run):
    """MLflow / TensorBoard logging happens when they are installed and is skipped (one log line) when not."""
    import importlib.util

    log = (report_run / "logs" / "run.log").read_text()
    for name in ("mlflow", "tensorboard"):
        if importlib.util.find_spec(name) is None:
            assert f"tracking: {name} is not installed; skipped" in log
        else:
            assert f"tracking: {name}" in log and "failed" not in log


def test_report_is_one_self_contained_page(report_run):
    html = (report_run / "report.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    s = json.loads((report_run / "summary.json").read_text())
    assert s["verdict"]["text"].replace("'", "&#39;") in html.replace("&#34;", '"')
    for section in ('id="verdict"', 'id="chart-accuracy"', 'id="prompts"', 'id="methods"', 'id="chart-diff"',
                    'id="chart-loss"', 'id="training"', 'id="cost"', 'id="examples"', 'id="stages"'):
        assert section in html, section
    assert html.count("<svg") == 3  # accuracy bars, the difference vs the best prompt, the loss curves
    for p in s["prompts"]:
        assert f"<b>{p['variant']}</b>" in html
    # the examples table shows the same item for the best prompt and the tuned model, with the gold answer
    examples = html[html.index('id="examples"'):]
    assert f"{s['best_prompt']['variant']} (best prompt)" in examples and "<th>lora</th>" in examples


@needs_webdriver
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    page = (report_run / "report.html").resolve()
    wd = WebDriver(tmp_path / "profile")
    try:
        wd.call("POST", "/url", {"url": page.as_uri()})
        assert wd.js("return document.readyState") == "complete"
        assert wd.js("return document.title") == "tunelab run: tiny"
        charts = wd.js("""return Array.from(document.querySelectorAll('.chart')).map(c => {
            const s = c.querySelector('svg'); const r = s ? s.getBoundingClientRect() : {width: 0, height: 0};
            return {id: c.id, w: r.width, h: r.height,
                    marks: s ? s.querySelectorAll('path, rect, use, line, polyline').length : 0,
                    text: s ? s.querySelectorAll('text').length : 0}; })""")
        assert [c["id"] for c in charts] == ["chart-accuracy", "chart-diff", "chart-loss"]
        for c in charts:
            assert c["w"] > 300 and c["h"] > 80, c   # drawn at a readable size, not collapsed
            assert c["marks"] >= 5 and c["text"] >= 3, c   # axes, bars/lines and labels are there
        # the accuracy chart has one bar per prompt and one per tuned model: 3 prompts + lora
        labels = wd.js("return Array.from(document.querySelectorAll('#chart-accuracy svg text'))"
                       ".map(t => t.textContent)")
        assert {"prompt: short", "prompt: few_shot", "prompt: zero_shot", "tuned: lora (short)"} <= set(labels)
        widths = wd.js("return Array.from(document.querySelectorAll('table'))"
                       ".map(t => t.getBoundingClientRect().width)")
        assert len(widths) >= 6 and min(widths) > 200
        assert wd.js("return performance.getEntriesByType('resource').length") == 0  # nothing fetched
        assert "<script>" in wd.js("return document.getElementById('examples').innerText")  # shown as text
        assert wd.js("return document.querySelectorAll('script').length") == 0
        logs = wd.call("POST", "/se/log", {"type": "browser"})
        errors = [e for e in logs if e.get("level") in ("SEVERE", "ERROR")]
        assert not errors, errors
        height = wd.js("return document.documentElement.scrollHeight")
        wd.call("POST", "/window/rect", {"width": 1280, "height": min(int(height) + 40, 6000)})
        png = base64.b64decode(wd.call("GET", "/screenshot"))
    finally:
        wd.close()
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    assert png[:8] == PNG and len(png) > 50_000
    keep = os.environ.get("TUNELAB_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "run_report.png")
        shutil.copyfile(page, Path(keep) / "run_report.html")
