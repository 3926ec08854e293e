"""Outputs: the full records, OpenAI fine-tuning chat JSONL, alpaca JSON, the stats summary; the OpenAI Batch
API input file and the ingestion of its results; and the contamination check against an eval set.

Every file is written whole to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import statistics
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable

from tunelab.data.io import read_records, write_jsonl
from tunelab.errors import DataError
from tunelab.textfiles import text_lines
from tunelab.generate.client import token_logprobs
from tunelab.generate.resolver import Request, answer_entry
from tunelab.generate.journal import Journal
from tunelab.generate.quality import Drops, normalize, tokens
from tunelab.results import write_json

BATCH_MAX_REQUESTS = 50_000  # OpenAI Batch API limits per input file
BATCH_MAX_BYTES = 190 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# training data
# ------------------------------------------------------------------------------------------------------
def write_outputs(out_dir: Path, rows: list, *, formats: list[str], provenance: bool) -> dict[str, str]:
    """data.jsonl (always: records + provenance), chat.jsonl and/or alpaca.json. Returns name -> path."""
    paths = {"data": out_dir / "data.jsonl"}
    write_jsonl(paths["data"], ({**r.data, "provenance": r.provenance} for r in rows))
    if "chat" in formats:
        paths["chat"] = out_dir / "chat.jsonl"
        write_jsonl(paths["chat"], ({"messages": r.messages, **({"provenance": r.provenance} if provenance else {})}
                                    for r in rows))
    if "alpaca" in formats:
        paths["alpaca"] = out_dir / "alpaca.json"
        write_json(paths["alpaca"], [{**r.alpaca, **({"provenance": r.provenance} if provenance else {})}
                                     for r in rows])
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------------
# OpenAI Batch API
# ------------------------------------------------------------------------------------------------------
def batch_line(req: Request, model: str, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"custom_id": req.key, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": req.messages, **req.params, **(extra_body or {})}}


def write_batch_input(out_dir: Path, reqs: list[Request], model: str,
                      extra_body: dict[str, Any] | None = None) -> list[str]:
    """The Batch API input file(s) for ``reqs``, split at the API's per-file limits."""
    for old in out_dir.glob("batch_input*.jsonl"):
        old.unlink()
    files: list[list[dict]] = [[]]
    size = 0
    for r in reqs:
        line = batch_line(r, model, extra_body)
        n = len(json.dumps(line, ensure_ascii=False).encode("utf-8")) + 1
        if files[-1] and (len(files[-1]) >= BATCH_MAX_REQUESTS or size + n > BATCH_MAX_BYTES):
            files.append([])
            size = 0
        files[-1].append(line)
        size += n
    paths = []
    for k, lines in enumerate(files):
        p = out_dir / ("batch_input.jsonl" if len(files) == 1 else f"batch_input_{k:03d}.jsonl")
        write_jsonl(p, lines)
        paths.append(str(p))
    return paths


def ingest_batch_results(paths: Iterable[Path], journal: Journal) -> dict[str, int]:
    """Put a Batch API results file (or several) into the journal. Failed lines are journaled as errors, so
    the next ``--batch-api`` run asks for them again."""
    counts = {"ok": 0, "error": 0, "already_done": 0}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"no such file: {p}")
        with closing(text_lines(p)) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{p}:{lineno}"
                try:
                    row = json.loads(raw)
                    cid = row["custom_id"]
                except (ValueError, KeyError, TypeError):
                    raise DataError("expected a Batch API result line with custom_id, response and error",
                                    where=where) from None
                if journal.done(cid):
                    counts["already_done"] += 1
                    continue
                resp = row.get("response") or {}
                body = resp.get("body") or {}
                req = Request(key=cid, messages=[], params={}, item="", kind="batch")
                try:
                    if row.get("error") or int(resp.get("status_code", 0)) != 200:
                        raise ValueError
                    choice = body["choices"][0]
                    text = choice["message"]["content"]
                    if not isinstance(text, str):
                        raise ValueError
                except (ValueError, KeyError, IndexError, TypeError):
                    err = row.get("error") or body.get("error") or {"status_code": resp.get("status_code")}
                    journal.append({"key": cid, "status": "error", "kind": "batch", "reason": "batch_error",
                                    "error": json.dumps(err, ensure_ascii=False)[:300]})
                    counts["error"] += 1
                    continue
                usage = body.get("usage") or {}
                journal.append(answer_entry(
                    req, text=text, finish_reason=choice.get("finish_reason") or "stop",
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0), latency_ms=0.0, source="batch",
                    model=str(body.get("model") or ""), logprobs=token_logprobs(choice)))
                counts["ok"] += 1
    journal.sync()
    return counts


# ------------------------------------------------------------------------------------------------------
# contamination
# ------------------------------------------------------------------------------------------------------
def _ngrams(toks: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def contamination_check(rows: list, eval_path: Path, *, fields: list[str], n: int) -> tuple[dict[str, Any], set[int]]:
    """Which generated rows overlap the eval set: the same text (normalised), or a shared word n-gram.

    Texts shorter than n words count only when they match an eval text whole. Returns the report and the
    indices of contaminated rows."""
    items = read_records(eval_path)
    exact: set[str] = set()
    grams: set[tuple[str, ...]] = set()
    for it in items:
        for f in fields:
            v = it.get(f)
            if isinstance(v, str) and v.strip():
                exact.add(normalize(v))
                grams |= _ngrams(tokens(v), n)
    hits: set[int] = set()
    n_exact = n_gram = 0
    examples = []
    for i, r in enumerate(rows):
        kind = None
        for t in r.texts:
            if not t or not t.strip():
                continue
            if normalize(t) in exact:
                kind = "exact"
                break
            if _ngrams(tokens(t), n) & grams:
                kind = "ngram"
        if kind:
            hits.add(i)
            n_exact += kind == "exact"
            n_gram += kind == "ngram"
            if len(examples) < 5:
                examples.append({"id": r.data.get("id"), "match": kind, "text": (r.texts[0] or "")[:200]})
    report = {"eval_path": str(eval_path), "eval_items": len(items), "rows_checked": len(rows),
              "contaminated": len(hits), "exact": n_exact, "ngram": n_gram, "ngram_n": n,
              "rate": round(len(hits) / len(rows), 4) if rows else 0.0, "examples": examples}
    return report, hits


# ------------------------------------------------------------------------------------------------------
# stats
# ------------------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency_summary(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 1), "p50": round(percentile(xs, 0.5), 1),
            "p95": round(percentile(xs, 0.95), 1), "max": round(max(xs), 1)}


def drops_summary(drops: Drops) -> dict[str, Any]:
    return drops.as_dict()
