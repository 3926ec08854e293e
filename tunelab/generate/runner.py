"""One `tunelab generate` run: load the config, inputs and prompt spec; resolve answers (journal, cache,
teacher or Batch API); check, dedup and export; write the stats summary.

Output folder::

    journal.jsonl     every teacher answer, append-only (what makes reruns resume)
    data.jsonl        kept records with their provenance
    chat.jsonl        OpenAI fine-tuning chat format (what `tunelab train` and the OpenAI API take)
    alpaca.json       alpaca format
    stats.json        kept / dropped and why, requests, retries, tokens, cost, latency, contamination
    batch_input.jsonl (--batch-api) requests for the OpenAI Batch API
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab import __version__
from tunelab.data.io import read_records
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.textfiles import read_text
from tunelab.evaluate.cache import CallCache, stable_hash
from tunelab.generate.client import TeacherClient, TeacherFatal, estimate_tokens, redact_url, resolve_key
from tunelab.generate.config import GenerateConfig, Price, field_line, load_generate_config
from tunelab.generate.resolver import Resolver
from tunelab.generate.export import (contamination_check, ingest_batch_results, latency_summary, write_batch_input,
                                     write_outputs)
from tunelab.generate.journal import Journal
from tunelab.generate.pipelines import (PIPELINES, SELF_INSTRUCT_PROMPT, SELF_INSTRUCT_SYSTEM, PipelineResult,
                                        SelfInstructPipeline)
from tunelab.generate.results import GenerateDryRun, GenerateStats


@dataclass
class RunOptions:
    out: Path | None = None
    limit: int | None = None
    dry_run: bool = False
    batch_api: bool = False
    batch_results: list[Path] = field(default_factory=list)
    use_cache: bool = True
    concurrency: int | None = None
    model: str | None = None
    base_url: str | None = None
    eval_set: Path | None = None
    progress: Callable[[int, int], None] | None = None


def _rel(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def price_for(cfg: GenerateConfig) -> Price | None:
    if cfg.teacher.price is not None:
        return cfg.teacher.price
    from tunelab.models.openai_api import PRICES

    p = PRICES.get(cfg.teacher.model)
    return Price(input=p[0], output=p[1]) if p else None


def load_inputs(cfg: GenerateConfig, base: Path, limit: int | None,
                fields: list[str] | None = None) -> tuple[list[dict], list[str], Path, int]:
    """The inputs (up to the limit, after ``data.exclude``), their ids, the file, and how many were excluded."""
    assert cfg.data is not None
    path = _rel(base, cfg.data.path)
    lim = min(x for x in (limit, cfg.data.limit) if x is not None) if (limit or cfg.data.limit) else None
    # with data.exclude the limit counts the inputs left, so the file is read whole
    items = read_records(path, limit=None if cfg.data.exclude else lim, encoding=cfg.data.encoding,
                         encoding_option="data.encoding:")
    excluded = 0
    if cfg.data.exclude:
        fields = fields or ["text"]
        known = _excluded_keys([_rel(base, e) for e in cfg.data.exclude], fields, cfg.data.encoding)
        kept = []
        for it in items:
            if lim is not None and len(kept) >= lim:
                break
            if tuple(str(it.get(f)) for f in fields) in known:
                excluded += 1
            else:
                kept.append(it)
        if items and not kept:
            raise DataError(f"every input is in data.exclude ({excluded} of them)", where=str(path))
        items = kept
    if not items:
        raise DataError("no inputs in the file", where=str(path))
    id_field = cfg.data.id_field or ("id" if "id" in items[0] else None)
    ids: list[str] = []
    first: dict[str, int] = {}
    for it in items:
        if id_field:
            if it.get(id_field) is None:
                raise DataError(f"missing id field {id_field!r}", where=f"{path}:{it.get('_line')}")
            iid = str(it[id_field])
        else:
            iid = f"line{it.get('_line')}"
        if iid in first:
            raise DataError(f"duplicate id {iid!r} (first on line {first[iid]}); ids name the output rows, so they "
                            "must be unique (or set data.id_field)", where=f"{path}:{it.get('_line')}")
        first[iid] = it.get("_line")
        ids.append(iid)
    return items, ids, path, excluded


def _excluded_keys(paths: list[Path], fields: list[str], encoding: str | None) -> set[tuple[str, ...]]:
    """The values of ``fields`` of every record of the ``data.exclude`` files."""
    keys: set[tuple[str, ...]] = set()
    for p in paths:
        if not p.is_file():
            raise DataError("data.exclude: no such file", where=str(p))
        for rec in read_records(p, encoding=encoding, encoding_option="data.encoding:"):
            missing = [f for f in fields if f not in rec]
            if missing:
                raise DataError(f"data.exclude: the prompt reads {missing[0]!r}, which this record lacks",
                                where=f"{p}:{rec.get('_line')}")
            keys.add(tuple(str(rec[f]) for f in fields))
    return keys


def load_seed_tasks(path: Path) -> list[dict]:
    seeds = read_records(path)
    for s in seeds:
        if not isinstance(s.get("instruction"), str) or not s["instruction"].strip():
            raise DataError("a seed task needs an 'instruction' string", where=f"{path}:{s.get('_line')}")
        inst = s.get("instances", [{}])
        if not isinstance(inst, list) or not all(isinstance(x, dict) for x in inst):
            raise DataError("'instances' must be a list of {input, output} objects", where=f"{path}:{s.get('_line')}")
    if not seeds:
        raise DataError("no seed tasks in the file", where=str(path))
    return seeds


def load_spec(cfg: GenerateConfig, base: Path) -> tuple[Any, str]:
    if cfg.prompt is None:
        return None, stable_hash([SELF_INSTRUCT_SYSTEM, SELF_INSTRUCT_PROMPT], 16)
    from tunelab.prompts import load_prompt_spec

    path = _rel(base, cfg.prompt)
    if not path.is_file():
        raise ConfigError(f"prompt: no such file: {path}", where=str(base))
    spec = load_prompt_spec(path)
    if cfg.pipeline == "label" and (getattr(spec, "task", None) != "label" or not getattr(spec, "labels", None)):
        raise ConfigError(f"pipeline label needs a label PromptSpec with a label set; {path.name} has task "
                          f"{getattr(spec, 'task', None)!r}", where=str(path))
    return spec, str(spec.content_hash())


def run_generate(config_path: Path, opts: RunOptions) -> GenerateStats | GenerateDryRun:
    """Run a config end to end; returns the stats (also written to stats.json), or with ``dry_run`` the estimate."""
    config_path = Path(config_path)
    cfg = load_generate_config(config_path)
    base = config_path.parent
    teacher_upd: dict[str, Any] = {}
    if opts.concurrency:
        teacher_upd["concurrency"] = opts.concurrency
    if opts.model:
        teacher_upd["model"] = opts.model
    if opts.base_url:
        teacher_upd["base_url"] = opts.base_url
    if teacher_upd:
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update=teacher_upd)})
    price = price_for(cfg)
    if cfg.budget.max_cost_usd is not None and price is None:
        raise ConfigError(f"budget.max_cost_usd needs a price for {cfg.teacher.model}: set teacher.price "
                          "{input: USD per 1M tokens, output: USD per 1M tokens}", where=str(config_path))
    if cfg.quality.json_schema is not None and isinstance(cfg.quality.json_schema, str):
        sp = _rel(base, cfg.quality.json_schema)
        if not sp.is_file():
            raise ConfigError(f"quality.json_schema: no such file: {sp}", where=str(config_path))
        try:
            cfg.quality.json_schema = json.dumps(json.loads(read_text(sp, error=ConfigError)))
        except ValueError as e:
            raise ConfigError(f"quality.json_schema: not JSON ({e})", where=str(sp)) from None

    # Inputs first: bad data fails before anything is sent.
    spec, prompt_hash = load_spec(cfg, base)
    items: list[dict] = []
    ids: list[str] = []
    data_path = ""
    seeds: list[dict] = []
    excluded = 0
    if cfg.pipeline in ("label", "respond"):
        items, ids, dp, excluded = load_inputs(cfg, base, opts.limit,
                                               spec.input_fields() if spec is not None else None)
        data_path = str(dp)
    else:
        assert cfg.self_instruct is not None
        seeds = load_seed_tasks(_rel(base, cfg.self_instruct.seed_tasks))
        if opts.limit:
            cfg.self_instruct.num_instructions = min(cfg.self_instruct.num_instructions, opts.limit)
    eval_path = opts.eval_set or (_rel(base, cfg.contamination.eval_path) if cfg.contamination else None)
    if eval_path is not None and not Path(eval_path).is_file():
        raise DataError(f"eval set: no such file: {eval_path}")

    out_dir = opts.out or Path(cfg.output.dir or f"runs/generate/{cfg.name}")  # relative to the cwd, like --out
    scratch = None
    if opts.dry_run and not (out_dir / "journal.jsonl").exists():
        scratch = tempfile.TemporaryDirectory(prefix="tunelab-dry-run-")  # a dry run writes nothing
        journal = Journal(Path(scratch.name) / "journal.jsonl")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(out_dir / "journal.jsonl")
    cache = None
    try:
        ingested = ingest_batch_results(opts.batch_results, journal) if opts.batch_results else None
        cache = CallCache(_cache_path()) if (cfg.cache and opts.use_cache and not opts.dry_run) else None
        base_url = cfg.teacher.base_url
        endpoint = redact_url(base_url or _env_base_url() or "https://api.openai.com/v1")
        mode = "dry" if opts.dry_run else ("batch" if opts.batch_api else "online")

        def client_factory() -> TeacherClient:
            try:
                key = resolve_key(cfg.teacher, base)
                return TeacherClient(cfg.teacher, api_key=key, rng_seed=cfg.seed)
            except ModelError as e:
                raise ConfigError(e.message, where=_where(config_path, "teacher")) from None

        resolver = Resolver(journal=journal, model=cfg.teacher.model, endpoint=endpoint, mode=mode,
                        client_factory=client_factory, budget=cfg.budget, price=price,
                        concurrency=cfg.teacher.concurrency, cache=cache, progress=opts.progress)
        kw = dict(spec=spec, prompt_hash=prompt_hash, items=items, ids=ids, data_path=data_path)
        pipeline = (SelfInstructPipeline(cfg, resolver, seeds=seeds, **kw) if cfg.pipeline == "self-instruct"
                    else PIPELINES[cfg.pipeline](cfg, resolver, **kw))
        t0 = time.perf_counter()
        result = asyncio.run(_run(pipeline, resolver, config_path))
        wall = time.perf_counter() - t0

        if opts.dry_run:
            return _dry_run_summary(cfg, resolver, price, result)

        rows = result.rows
        contamination = None
        if eval_path is not None:
            cc = cfg.contamination
            fields = cc.fields if cc else ["text", "question", "instruction", "input"]
            contamination, hits = contamination_check(rows, Path(eval_path), fields=fields, n=cc.ngram if cc else 8)
            if cc and cc.drop and hits:
                for i in sorted(hits):
                    pipeline.drops.add("contaminated", id=rows[i].data.get("id"))
                rows = [r for i, r in enumerate(rows) if i not in hits]
        rows, more = pipeline.finalize(rows)
        result.extra.update(more)
        if excluded:
            result.extra["excluded_inputs"] = excluded
        paths = write_outputs(out_dir, rows, formats=cfg.output.formats, provenance=cfg.output.provenance)
        batch_files: list[str] = []
        if opts.batch_api and resolver.pending:
            batch_files = write_batch_input(out_dir, resolver.pending, cfg.teacher.model, cfg.teacher.extra_body)
        elif opts.batch_api:
            for old in out_dir.glob("batch_input*.jsonl"):
                old.unlink()
        stats = _stats(cfg, config_path, resolver, pipeline, result, rows, price, wall, paths, contamination,
                       ingested, batch_files, len(items) if items else None)
        stats.write(out_dir / "stats.json")
        return stats
    finally:
        journal.close()
        if cache is not None:
            cache.close()
        if scratch is not None:
            scratch.cleanup()


async def _run(pipeline: Any, resolver: Resolver, config_path: Path) -> PipelineResult:
    try:
        return await pipeline.run()
    except TeacherFatal as e:
        raise TeacherFatal(e.message, where=_where(config_path, "teacher", "base_url")) from None
    finally:
        await resolver.aclose()


def _where(config_path: Path, *loc: str) -> str:
    """``file:line`` of a config field (or of its parent, or just the file)."""
    line = field_line(config_path, loc)
    return f"{config_path}:{line}" if line else str(config_path)


def _cache_path() -> Path:
    from tunelab.models.convert import cache_root

    return cache_root() / "generate.sqlite"


def _env_base_url() -> str | None:
    import os

    return os.environ.get("OPENAI_BASE_URL") or None


def _dry_run_summary(cfg: GenerateConfig, resolver: Resolver, price: Price | None,
                     result: PipelineResult) -> GenerateDryRun:
    reqs = resolver.pending
    p = sum(estimate_tokens(r.messages) for r in reqs)
    c = sum(int(r.params.get("max_tokens") or 0) for r in reqs)
    note = None
    if cfg.pipeline == "self-instruct":
        note = ("self-instruct runs in rounds; this is the first round only: expect about "
                f"{cfg.self_instruct.num_instructions // max(1, cfg.self_instruct.tasks_per_request // 2)} requests "
                "in all (half the asked-for tasks kept)")
    return GenerateDryRun(pipeline=cfg.pipeline, teacher=cfg.teacher.model, endpoint=resolver.endpoint,
                          requests_to_send=len(reqs), already_done=resolver.counts.resumed, prompt_tokens_est=p,
                          max_completion_tokens=c, max_cost_usd=round(resolver.cost(p, c), 6) if price else None,
                          note=note)


def _stats(cfg, config_path, resolver: Resolver, pipeline, result: PipelineResult, rows, price, wall, paths,
           contamination, ingested, batch_files, n_inputs) -> GenerateStats:
    used = list(resolver.used.values())
    billed = [a for a in used if a.source in ("api", "batch")]
    ptok = sum(a.prompt_tokens for a in billed)
    ctok = sum(a.completion_tokens for a in billed)
    cost = sum(resolver.cost(a.prompt_tokens, a.completion_tokens, batch=a.source == "batch") for a in billed) \
        if price else None
    client = resolver.client
    return GenerateStats.model_validate({
        "name": cfg.name, "pipeline": cfg.pipeline, "config": str(config_path), "tunelab": __version__,
        "teacher": {"model": cfg.teacher.model, "endpoint": resolver.endpoint,
                    "price_per_1m": price.model_dump() if price else None},
        "sampling": cfg.sampling.model_dump(),
        "inputs": n_inputs,
        "kept": len(rows),
        "dropped": result.drops.as_dict(),
        "pending": result.pending,
        "stopped": resolver.stopped if resolver.stopped not in ("batch", None) else None,
        "requests": {"answers_used": len(used), "from_journal": resolver.counts.resumed,
                     "from_cache": resolver.counts.cached, "fetched": resolver.counts.fetched,
                     "failed": dict(resolver.counts.failed), "http_sent": client.stats.sent if client else 0,
                     "retries": dict(client.stats.retries) if client else {},
                     "repairs_asked": pipeline.repairs, "repairs_ok": pipeline.repaired_ok},
        "tokens": {"prompt": ptok, "completion": ctok,
                   "all_answers_prompt": sum(a.prompt_tokens for a in used),
                   "all_answers_completion": sum(a.completion_tokens for a in used)},
        "cost_usd": round(cost, 6) if cost is not None else None,
        "budget": {**cfg.budget.model_dump(), "spent_requests": resolver.spent.requests,
                   "spent_tokens": resolver.spent.tokens, "spent_cost_usd": round(resolver.spent.cost_usd, 6)},
        "latency_ms": latency_summary([a.latency_ms for a in used if a.source == "api" and a.latency_ms > 0]),
        "wall_s": round(wall, 2),
        **result.extra,
        "contamination": contamination,
        "outputs": paths,
        "batch_ingested": ingested,
        "batch_input": batch_files or None,
    })


__all__ = ["RunOptions", "run_generate", "load_generate_config"]
