import re
import shutil
import subprocess

import numpy as np
import pytest

from tunelab.evaluate.metrics import compare_to_best, summarize_cell
from tunelab.report.html import render_report, write_report

LABELS = ["긍정", "부정", "중립"]
EVIL = "<script>alert(1)</script>"


def _summary(task: str, labels: list[str] | None, cells: dict[str, list[dict]], model: str = "smollm2") -> dict:
    """A summary shaped like the eval runner's, built from our own summarize_cell / compare_to_best."""
    comps = compare_to_best(cells)
    out = []
    for variant, rows in cells.items():
        cell = summarize_cell(rows, task, labels, n_boot=300)
        cell.update(variant=variant, model=model, mode="generate", comparison=comps.get(variant),
                    prompt_preview=f"[system]\n{variant} 지시문: 분류하세요.\n\n[user]\n{EVIL}")
        out.append(cell)
    scored = [c for c in out if "accuracy" in c["metrics"]]
    best = max(scored, key=lambda c: c["metrics"]["accuracy"]["value"]) if scored else None
    return {"title": "nsmc test", "created": "2025-01-01T00:00:00+00:00", "dataset": "nsmc", "n_items": 80,
            "task": task, "labels": labels, "metric": "accuracy", "cells": out,
            "best": best and {"variant": best["variant"], "model": model, "metric": "accuracy",
                              "value": best["metrics"]["accuracy"]["value"]},
            "notes": ["a note with <b>markup</b> & 한국어"]}


def _results(task: str, cells: dict[str, list[dict]], model: str = "smollm2") -> list[dict]:
    return [{**r, "variant": v, "model": model, "input": EVIL if r["item_id"] == "0" else f"영화 리뷰 {r['item_id']}",
             "raw_output": f"Answer: {r['prediction']} {EVIL}", "prompt_hash": "abc"}
            for v, rows in cells.items() for r in rows]


def _label_cells() -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    gold = rng.choice(LABELS, 80)
    cells = {}
    for variant, p_ok in (("zero_shot", 0.45), ("few_shot", 0.85), ("cot", 0.6)):
        rows = []
        for i, g in enumerate(gold):
            ok = i != 0 and rng.random() < p_ok  # item 0 (the malicious one) is always wrong
            pred = g if ok else (None if rng.random() < 0.2 else str(rng.choice([x for x in LABELS if x != g])))
            rows.append({"item_id": str(i), "sample": 0, "gold": str(g), "prediction": pred, "correct": pred == g,
                         "complied": pred is not None, "prompt_tokens": 120, "completion_tokens": 4,
                         "latency_ms": 80.0 + i, "cached": False})
        cells[variant] = rows
    return cells


def _number_cells() -> dict[str, list[dict]]:
    rng = np.random.default_rng(1)
    cells = {}
    for variant, p_ok in (("plain", 0.5), ("step_by_step", 0.7)):
        rows = []
        for i in range(40):
            for s in range(3):  # repeated sampling
                ok = i != 0 and rng.random() < p_ok
                rows.append({"item_id": str(i), "sample": s, "gold": str(i * 2), "prediction": i * 2 if ok else i,
                             "correct": ok, "complied": True, "prompt_tokens": 60, "completion_tokens": 30,
                             "latency_ms": 200.0, "cached": s > 0})
        cells[variant] = rows
    return cells


EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def _check_common(html: str, variants: list[str]) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in html
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    assert "<script" not in html.lower()  # escaped everywhere, and the report has no scripts of its own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<svg" in html
    assert "&lt;b&gt;markup&lt;/b&gt; &amp; 한국어" in html
    for v in variants:
        assert v in html


def test_label_report():
    cells = _label_cells()
    summary = _summary("label", LABELS, cells)
    html = render_report(summary, _results("label", cells), title="NSMC <prompts>")
    _check_common(html, list(cells))
    assert "<title>NSMC &lt;prompts&gt;</title>" in html
    assert "Best: few_shot" in html
    assert re.search(r"few_shot beats zero_shot by \+\d+\.\d points \(p(=|&lt;)[0-9.]+, significant\)", html)
    assert html.count("<svg") == 1 + len(cells)  # the bar chart and one confusion matrix per cell
    assert "Confusion matrices" in html and "(invalid)" in html
    assert "중립" in html and "<details" in html
    assert "item 0 &mdash; 3 of 3 cells wrong" in html  # the worst example comes first


def test_number_report_with_repeats(tmp_path):
    cells = _number_cells()
    summary = _summary("number", None, cells)
    path = write_report(tmp_path / "out" / "report.html", summary, _results("number", cells), title="math")
    html = path.read_text(encoding="utf-8")
    _check_common(html, list(cells))
    assert "Confusion matrices" not in html
    assert "flaky items" in html
    assert "Best: step_by_step" in html


def test_report_without_gold_and_several_models():
    rows = [{"item_id": str(i), "sample": 0, "gold": None, "prediction": {"name": "x"} if i % 4 else None,
             "correct": None, "complied": bool(i % 4), "json_parsed": bool(i % 4), "prompt_tokens": 10,
             "completion_tokens": 5, "latency_ms": 10.0, "cached": False} for i in range(20)]
    cells = {"json_a": rows, "json_b": [{**r, "complied": True, "prediction": {"name": "김"}} for r in rows]}
    summary = _summary("json", None, cells, model="m1")
    assert summary["best"] is None
    summary["cells"][1]["model"] = "m2"  # two models: cells are named "variant @ model"
    results = [{**r, "model": "m2"} if r["variant"] == "json_b" else r for r in _results("json", cells, model="m1")]
    html = render_report(summary, results, title="json")
    _check_common(html, list(cells))
    assert "No gold answers" in html
    assert "json_a @ m1" in html and "json_b @ m2" in html
    assert "0 of 2 cells" not in html and "1 of 2 cells did not comply" in html
    assert "{&#34;name&#34;: &#34;김&#34;}" in html  # JSON predictions shown as JSON, escaped


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium) - headless rendering not checked")
def test_report_renders_in_headless_chromium(tmp_path):
    cells = _label_cells()
    path = write_report(tmp_path / "report.html", _summary("label", LABELS, cells), _results("label", cells),
                        title="chromium")
    png = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={png}", "--window-size=1200,2000", path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), proc.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a rendered page with tables and charts, not a blank image
