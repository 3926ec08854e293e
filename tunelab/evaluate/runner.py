"""The eval matrix: prompt variants x models over one dataset, with per-item results and statistics.

One cell = (variant, model). Label tasks on local models are scored by the log-likelihood of each label
(``loglik``: no sampling, no parsing failures, one batched forward per item); everything else is
generated in batches and parsed by the spec's output parser. A failing item is recorded as a failure and
the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab import __version__
from tunelab.config import EvalConfig, ModelConfig, load_yaml, validate_as
from tunelab.data.io import JsonlAppender, read_records, record_location
from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.cache import CallCache, prompt_hash
from tunelab.evaluate.results import Best, Cell, DryRunPlan, EvalRow, EvalSummary
from tunelab.models import GenerationParams, ModelBackend, load_model
from tunelab.prompts import PromptSpec, load_prompt_spec

Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)


@dataclass
class Variant:
    name: str
    spec: PromptSpec


@dataclass
class Dataset:
    path: Path
    name: str
    items: list[dict[str, Any]]
    ids: list[str]


@dataclass
class CellPlan:
    variant: Variant
    model_cfg: ModelConfig
    mode: str  # "loglik" | "generate"
    messages: list[list[dict]] = field(default_factory=list)


def load_eval_config(path: str | Path) -> EvalConfig:
    return validate_as(EvalConfig, load_yaml(path), path)


def load_variants(cfg: EvalConfig, base_dir: Path) -> list[Variant]:
    variants = []
    for name, v in cfg.variants.items():
        if isinstance(v, str):
            spec = load_prompt_spec(base_dir / v)
        else:
            spec = _inline_spec(v, base_dir, f"variants.{name}")
        variants.append(Variant(name, spec))
    tasks = {v.spec.task for v in variants}
    if len(tasks) > 1:
        raise ConfigError(f"variants must share one output type to be compared, got {sorted(tasks)}",
                          where="variants")
    return variants


def _inline_spec(data: dict, base_dir: Path, where: str) -> PromptSpec:
    from tunelab.prompts import spec_from_dict

    return spec_from_dict(data, base_dir=base_dir, source=where)


def load_dataset(cfg: EvalConfig, base_dir: Path, limit: int | None = None) -> Dataset:
    path = Path(cfg.data.path)
    if not path.is_absolute():
        path = base_dir / path
    n = limit or cfg.data.limit
    items = read_records(path, limit=n, encoding=cfg.data.encoding, encoding_option="--encoding")
    if not items:
        raise DataError("the dataset has no items", where=str(path))
    id_field = cfg.data.id_field or ("id" if "id" in items[0] else None)
    ids = []
    for i, it in enumerate(items):
        if id_field is not None and id_field not in it:
            raise DataError(f"missing id field {id_field!r}", where=record_location(it, path))
        ids.append(str(it[id_field]) if id_field else str(i))
    if len(set(ids)) != len(ids):
        raise DataError(f"item ids are not unique (field {id_field!r})", where=str(path))
    return Dataset(path, cfg.data.name or path.stem, items, ids)


def check_gold(spec: PromptSpec, ds: Dataset) -> None:
    """Gold answers must be usable: a label outside the label set is an input error, not a wrong answer."""
    labels = spec.labels
    for it in ds.items:
        gold = spec.gold(it)
        if labels and gold is not None and str(gold) not in labels:
            raise DataError(f"label {gold!r} is not in the label set {labels}", where=record_location(it, ds.path))


def gold_hint(spec: PromptSpec, items: list[dict[str, Any]]) -> str:
    """Why no item has a gold answer, and the setting that fixes it: the fields the items do have, the fields
    the prompt spec looks for, and ``target_field`` (with the field that looks like the labels, when one does)."""
    from tunelab.prompts.spec import GOLD_FIELDS

    fields = [k for k in dict.fromkeys(k for it in items for k in it) if not str(k).startswith("_")]
    looks_for = repr(spec.target_field) if spec.target_field else ", ".join(GOLD_FIELDS[:-1]) + " or " + GOLD_FIELDS[-1]
    labels = set(spec.labels or [])
    guess = next((f for f in fields if labels and all(str(it.get(f)) in labels for it in items if f in it)), None)
    fix = f"target_field: {guess}" if guess else "target_field: FIELD"
    return (f"the items have the fields {', '.join(fields) or 'none'}, and the prompt spec looks for {looks_for}: "
            f"set {fix} in the prompt spec (or name the gold field {GOLD_FIELDS[0]!r})")


def data_warnings(spec: PromptSpec, ds: Dataset) -> list[str]:
    """What makes a score meaningless though nothing fails: most inputs empty, no gold answer at all."""
    out = []
    empty = 0
    for it in ds.items:
        try:
            empty += not spec.render_input(it).strip()
        except DataError as e:
            raise DataError(e.message, where=record_location(it, ds.path)) from None
    n = len(ds.items)
    if empty and empty * 2 >= n:
        out.append(f"{'all' if empty == n else f'{empty} of'} {n} items have an empty input (the input "
                   f"template {spec.input_template!r} renders to nothing): the scores measure the prompt alone; "
                   "check the data's text field or the prompt spec's input_template")
    if all(spec.gold(it) is None for it in ds.items):
        out.append(f"no gold answers, so no accuracy: {gold_hint(spec, ds.items)}")
    return out


def cell_mode(cfg: EvalConfig, spec: PromptSpec, model: ModelBackend | None, mcfg: ModelConfig) -> str:
    scoring_ok = model.supports_scoring if model is not None else not (mcfg.model or "").startswith("openai:")
    use_loglik = (spec.task == "label" and scoring_ok and getattr(spec.reasoning, "type", "none") == "none")
    if cfg.scoring == "loglik":
        if not use_loglik:
            raise ConfigError("scoring: loglik needs a label task without reasoning on a local model",
                              where="scoring")
        return "loglik"
    if cfg.scoring == "generate":
        return "generate"
    return "loglik" if use_loglik else "generate"


def _environment() -> dict:
    import torch
    import transformers

    return {"tunelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count()}


class EvalRunner:
    def __init__(self, cfg: EvalConfig, base_dir: Path, out_dir: Path, *, limit: int | None = None,
                 use_cache: bool = True, progress: Progress | None = None,
                 log: Callable[[str], None] = lambda s: None, warn: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.base_dir = base_dir
        self.out_dir = out_dir
        self.dataset = load_dataset(cfg, base_dir, limit)
        self.variants = load_variants(cfg, base_dir)
        for v in self.variants:
            check_gold(v.spec, self.dataset)
        self.model_cfgs = cfg.model_configs()
        self.cache = CallCache(enabled=use_cache)
        self.progress = progress
        self.log = log
        self.warn = warn or (lambda s: log(f"warning: {s}"))
        self.warnings: list[str] = []
        said: dict[str, list[str]] = {}  # one line for the variants a warning holds for
        for v in self.variants:
            for w in data_warnings(v.spec, self.dataset):
                said.setdefault(w, []).append(v.name)
        for w, names in said.items():
            self._warn(f"{', '.join(names)}: {w}")

    def _warn(self, message: str) -> None:
        """Say it now (``warn``) and keep it for the summary's notes and the dry run."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.warn(message)

    def check_context(self, v: Variant, m: ModelConfig, model: ModelBackend, mode: str,
                      msgs: list[list[dict]], counts: list[int] | None = None) -> list[int]:
        """The prompt tokens of each item; warns (once per cell) when items are longer than the model's context.

        Too-long items are scored as they are, not cut: cutting from the left (lm-eval-harness's choice) would drop
        the instruction and the few-shot examples this spec puts first, cutting from the right the input or the
        answer slot, and either way the score would be of another prompt than the one measured. The warning says
        how many, the longest and the limit, so the user can shorten the texts or pick a longer-context model."""
        limit = getattr(model, "context_length", None)
        if counts is None and not limit:
            return []
        counts = counts if counts is not None else [model.count_tokens(x) for x in msgs]
        if not limit or not msgs:
            return counts
        extra, what = 0, "prompt"
        if mode == "loglik" and hasattr(model, "choice_token_ids") and hasattr(model, "render"):
            text0 = model.render(msgs[0])
            extra = max((len(model.choice_token_ids(text0, c)) for c in v.spec.labels or []), default=0)
            what = "prompt and longest label"
        total = [c + extra for c in counts]
        over = [i for i, t in enumerate(total) if t > limit]
        if over:
            i = max(over, key=total.__getitem__)
            self._warn(f"{v.name} @ {m.display}: {len(over)} of {len(msgs)} items exceed the model's context "
                       f"of {limit:,} tokens (longest: item {self.dataset.ids[i]}, {total[i]:,} tokens of {what}, at "
                       f"{record_location(self.dataset.items[i], self.dataset.path)}); they are scored as they are, "
                       "past what the model was trained on: shorten those texts or use a longer-context model")
        return counts

    @property
    def task(self) -> str:
        return self.variants[0].spec.task

    def _load(self, m: ModelConfig) -> ModelBackend:
        opts: dict[str, Any] = {}
        if (m.model or "").startswith("openai:"):
            opts = dict(base_url=m.base_url, api_key_env=m.api_key_env, api_key_file=m.api_key_file,
                        concurrency=m.concurrency, price=m.price)
        else:
            opts = dict(dtype=m.dtype, batch_size=m.batch_size)
            if m.allow_other_base:
                opts["allow_other_base"] = True
        adapter = m.adapter
        if adapter and not Path(adapter).is_absolute() and (self.base_dir / adapter).exists():
            adapter = str(self.base_dir / adapter)
        return load_model(m.model, adapter=adapter, **opts)

    def _params(self, sample: int) -> GenerationParams:
        g = self.cfg.generation
        return GenerationParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                stop=tuple(g.stop), seed=g.seed + sample if g.temperature > 0 else None)

    # -- dry run -------------------------------------------------------------------------------------
    def dry_run(self) -> list[DryRunPlan]:
        """Items, token estimate and (for priced API models) cost per cell, before anything runs."""
        plans = []
        for m in self.model_cfgs:
            model = self._load(m)
            for v in self.variants:
                msgs = [v.spec.render(it) for it in self.dataset.items]
                mode = cell_mode(self.cfg, v.spec, model, m)
                prompt_tokens = sum(self.check_context(v, m, model, mode, msgs,
                                                       [model.count_tokens(x) for x in msgs]))
                samples = 1 if mode == "loglik" else self.cfg.generation.samples
                out_tokens = (len(v.spec.labels or []) * 3 if mode == "loglik"
                              else self.cfg.generation.max_new_tokens) * len(msgs) * samples
                cost = model.cost(prompt_tokens * samples, out_tokens) if hasattr(model, "cost") else None
                plans.append(DryRunPlan(variant=v.name, model=m.display, mode=mode, items=len(msgs), samples=samples,
                                        prompt_tokens=prompt_tokens * samples, max_output_tokens=out_tokens,
                                        cost_usd=cost))
        return plans

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> tuple[EvalSummary, list[EvalRow]]:
        """Every cell; the rows go to OUT/results.jsonl as they come, the summary is returned (the caller writes
        it, with anything it adds)."""
        from tunelab.evaluate.metrics import compare_to_best, summarize_cell

        self.out_dir.mkdir(parents=True, exist_ok=True)
        partial = self.out_dir / "results.partial.jsonl"
        partial.unlink(missing_ok=True)
        all_rows: list[EvalRow] = []
        cells: list[Cell] = []
        by_cell: dict[str, list[EvalRow]] = {}
        with JsonlAppender(partial) as out:
            for m in self.model_cfgs:
                model = self._load(m)
                warning = model.server_warning() if hasattr(model, "server_warning") else None
                if warning:
                    self.log(warning)
                for v in self.variants:
                    t0 = time.perf_counter()
                    mode = cell_mode(self.cfg, v.spec, model, m)
                    rows = self._run_cell(v, m, model, mode)
                    wall = time.perf_counter() - t0
                    for r in rows:
                        out.write(r.model_dump(mode="json"))
                    all_rows += rows
                    key = f"{v.name} @ {m.display}"
                    by_cell[key] = rows
                    stats = summarize_cell(rows, self.task, v.spec.labels, confidence=self.cfg.confidence,
                                           seed=self.cfg.seed)
                    first = v.spec.render(self.dataset.items[0])
                    cells.append(Cell(**dict(stats), variant=v.name, model=m.display, mode=mode,
                                      spec_hash=v.spec.content_hash(), wall_s=round(wall, 3),
                                      prompt_preview=_preview(first)))
                    self.log(f"{key}: done in {wall:.1f}s")
        metric = self.cfg.metric
        if any(metric in c.metrics for c in cells):
            comparisons = compare_to_best(by_cell, metric=metric)
            for c in cells:
                c.comparison = comparisons.get(c.key)
        best = _best(cells, metric)
        summary = EvalSummary(
            title=self.cfg.name, description=self.cfg.description,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            dataset=str(self.dataset.name), dataset_path=str(self.dataset.path), n_items=len(self.dataset.items),
            task=self.task, labels=self.variants[0].spec.labels, metric=metric, cells=cells, best=best,
            notes=self.warnings + _notes(cells, best, metric), config=self.cfg.model_dump(mode="json"), environment=_environment())
        os.replace(partial, self.out_dir / "results.jsonl")
        self.cache.close()
        return summary, all_rows

    def _run_cell(self, v: Variant, m: ModelConfig, model: ModelBackend, mode: str) -> list[EvalRow]:
        spec, items, ids = v.spec, self.dataset.items, self.dataset.ids
        msgs = [spec.render(it) for it in items]
        self.check_context(v, m, model, mode, msgs)
        hashes = [prompt_hash(x) for x in msgs]
        base = [{"variant": v.name, "model": m.display, "dataset": self.dataset.name, "item_id": ids[i],
                 "input": spec.render_input(items[i]), "gold": spec.gold(items[i]), "prompt_hash": hashes[i]}
                for i in range(len(items))]
        if mode == "loglik":
            labels = list(spec.labels or [])
            keys = [self.cache.key(model.identity, "loglik", labels, x) for x in msgs]
            answers = self._cached_call(keys, f"{v.name} @ {m.display}", lambda idx, adv: [
                {"logprobs": s.logprobs, "prompt_tokens": s.prompt_tokens,
                 "completion_tokens": sum(s.choice_tokens), "latency_ms": s.latency_ms}
                for s in model.score_choices([msgs[i] for i in idx], labels, progress=adv)])
            rows = []
            for i, (a, cached) in enumerate(answers):
                lp = a["logprobs"]
                pred = labels[max(range(len(lp)), key=lp.__getitem__)]
                rows.append(EvalRow(**base[i], sample=0, raw_output=pred, prediction=pred,
                                    correct=spec.is_correct(pred, base[i]["gold"]), complied=True,
                                    scores=dict(zip(labels, [round(x, 4) for x in lp])), cached=cached,
                                    prompt_tokens=a["prompt_tokens"], completion_tokens=a["completion_tokens"],
                                    latency_ms=0.0 if cached else round(a["latency_ms"], 2)))
            return rows
        rows = []
        for s in range(self.cfg.generation.samples):
            params = self._params(s)
            keys = [self.cache.key(model.identity, "generate", params.key(), x, s) for x in msgs]
            desc = f"{v.name} @ {m.display}" + (f" [{s + 1}/{self.cfg.generation.samples}]"
                                                  if self.cfg.generation.samples > 1 else "")
            answers = self._cached_call(keys, desc, lambda idx, adv, p=params: [
                {"text": g.text, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                 "finish_reason": g.finish_reason, "latency_ms": g.latency_ms}
                for g in model.generate([msgs[i] for i in idx], p, progress=adv)])
            for i, (a, cached) in enumerate(answers):
                parsed = spec.parse(a["text"])
                gold = base[i]["gold"]
                correct = (spec.is_correct(parsed.prediction, gold) if parsed.prediction is not None
                           else False) if gold is not None else None
                rows.append(EvalRow(
                    **base[i], sample=s, raw_output=a["text"], prediction=parsed.prediction, correct=correct,
                    complied=parsed.complied, parse_error=parsed.error, cached=cached,
                    finish_reason=a.get("finish_reason"), prompt_tokens=a["prompt_tokens"],
                    completion_tokens=a["completion_tokens"], latency_ms=0.0 if cached else round(a["latency_ms"], 2),
                    json_parsed=getattr(parsed, "json_parsed", parsed.prediction is not None)
                    if spec.task == "json" else None))
        return rows

    def _cached_call(self, keys: list[str], desc: str,
                     call: Callable[[list[int], Callable[[int], None]], list[dict]]) -> list[tuple[dict, bool]]:
        hits = self.cache.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in hits]
        results: dict[int, tuple[dict, bool]] = {i: (hits[k], True) for i, k in enumerate(keys) if k in hits}
        if missing:
            adv = self.progress(desc, len(missing)) if self.progress else (lambda n: None)
            fresh = call(missing, adv)
            self.cache.put_many((keys[i], a) for i, a in zip(missing, fresh))
            results.update({i: (a, False) for i, a in zip(missing, fresh)})
        return [results[i] for i in range(len(keys))]


def _preview(messages: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def _best(cells: list[Cell], metric: str) -> Best | None:
    scored = [c for c in cells if metric in c.metrics]
    if not scored:
        return None
    b = max(scored, key=lambda c: c.metrics[metric].value)
    return Best(variant=b.variant, model=b.model, metric=metric, value=b.metrics[metric].value)


def _notes(cells: list[Cell], best: Best | None, metric: str) -> list[str]:
    from tunelab.stats import format_p

    notes = []
    if best is None:
        return ["No gold answers in the dataset: only compliance, tokens and latency are reported (the prompt spec's "
                "target_field names the gold answer's field)."]
    for c in cells:
        comp = c.comparison
        if comp is None or comp.vs is None:
            continue
        notes.append(f"{c.key} vs best: {comp.diff * 100:+.1f} points (McNemar p={format_p(comp.p_value)}, "
                     f"Holm p={format_p(comp.p_holm)}, {comp.verdict})")
    labels_chance = [c for c in cells if c.confusion is not None]
    if labels_chance:
        k = len(labels_chance[0].confusion.labels) - 1
        if k > 0 and best.value < 1.0 / k + 0.1:
            notes.append(f"The best accuracy ({best.value:.1%}) is near chance ({1 / k:.1%} for {k} labels): "
                         "prompting alone does not solve this task with this model.")
    return notes
