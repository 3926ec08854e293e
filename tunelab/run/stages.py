"""The stages of `tunelab run`, each a thin layer over the library: eval (EvalRunner), generate
(run_generate), vocab (`tunelab vocab extend`), train (the LoRA/full/pretrain recipes, each from the base, the vocab
stage's model or an earlier method's model), eval_after (EvalRunner with the tuned models, paired tests
against the best prompt) and serve (the OpenAI-compatible server, smoke-tested with the openai client).

A stage says what its result depends on (``inputs``: resolved settings, content hashes of input files and
the outputs of the stages before it) and does its work (``run``), leaving everything in its folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.evaluate.results import EvalRow, EvalSummary
from tunelab.models import release_models
from tunelab.run.config import MethodPlan, PromptRef, ResolvedExperiment
from tunelab.run.results import (EvalAfterStageResult, EvalAfterSummary, EvalStageResult, GenerateStageResult,
                                 MethodEval, MethodHeadline, PairComparison, ServeAnswer, ServeStageResult, SmokeTest,
                                 StageRecord, StageResult, TrainStageResult, VocabStageResult, VsBaseline)
from tunelab.run.util import dir_sha, file_sha, model_identity, stable_hash
from tunelab.stats import PairedComparison

Log = Callable[[str], None]
R = TypeVar("R")


@dataclass
class Ctx:
    """What every stage sees: the experiment, the run folder, the results of the stages before it."""

    r: ResolvedExperiment
    out: Path
    log: Log
    progress: Callable | None = None       # (description, total) -> advance(n), for eval progress bars
    console: Any = None                    # a rich console for the training progress bar
    done: dict[str, StageRecord] = field(default_factory=dict)  # stage key -> its run.json record once done

    def upstream(self, key: str) -> StageRecord:
        st = self.done.get(key)
        if st is None or st.status != "done" or st.result is None:
            raise ConfigError(f"stage {key!r} has not finished yet: run without --only first", where=str(self.out))
        return st

    def upstream_result(self, key: str, kind: type[R]) -> R:
        res = self.upstream(key).result
        assert isinstance(res, kind), (key, type(res))
        return res


@dataclass
class Outcome:
    output_hash: str
    result: StageResult
    tokens: int = 0
    teacher_usd: float | None = None


def eval_limit(r: ResolvedExperiment) -> int | None:
    lims = [x for x in (r.exp.data.eval_limit, r.limit) if x is not None]
    return min(lims) if lims else None


def eval_config(r: ResolvedExperiment, variants: dict[str, PromptRef], models: list[dict]):
    from tunelab.config import EvalConfig, validate_as

    e = r.exp.eval
    return validate_as(EvalConfig, {
        "name": r.name, "description": r.exp.description,
        "data": {"path": str(r.eval_data), "limit": eval_limit(r), "id_field": r.exp.data.id_field,
                 "name": r.exp.data.name or r.eval_data.stem},
        "variants": {n: (str(p.path) if p.path else p.spec.resolved_dict()) for n, p in variants.items()},
        "models": models, "generation": e.generation.model_dump(), "scoring": e.scoring,
        "confidence": e.confidence, "seed": r.exp.seed, "metric": "accuracy"}, r.path)


def _model_cfg(r: ResolvedExperiment, name: str, *, adapter: Path | None = None, model: str | None = None) -> dict:
    e = r.exp.eval
    m = model or r.model
    return {"name": name, "model": None if m == "bundled" else m, "adapter": str(adapter) if adapter else None,
            "batch_size": e.batch_size, "dtype": e.dtype}


def _rows_hash(rows: list[EvalRow]) -> str:
    """The content of eval results that later stages read (not timings, not cache flags)."""
    return stable_hash(sorted((r.variant, r.model, r.item_id, r.sample, str(r.prediction), r.correct) for r in rows))


def _run_eval(ctx: Ctx, cfg, out_dir: Path) -> tuple[EvalSummary, list[EvalRow]]:
    from tunelab.evaluate.runner import EvalRunner

    runner = EvalRunner(cfg, ctx.r.base_dir, out_dir, use_cache=ctx.r.exp.eval.use_cache, progress=ctx.progress,
                        log=ctx.log)
    summary, rows = runner.run()
    summary.write(out_dir / "summary.json")
    return summary, rows


def _tokens(rows: list[EvalRow]) -> int:
    return sum(r.prompt_tokens + r.completion_tokens for r in rows)


# --------------------------------------------------------------------------------------------------
# eval: the prompt variants on the base model
# --------------------------------------------------------------------------------------------------
class EvalStage:
    key = "eval"
    deps: tuple[str, ...] = ()

    def inputs(self, ctx: Ctx) -> dict:
        r = ctx.r
        return {"model": model_identity(r.model), "data": file_sha(r.eval_data), "limit": eval_limit(r),
                "id_field": r.exp.data.id_field, "prompts": {n: p.hash for n, p in r.prompts.items()},
                "settings": r.exp.eval.model_dump(mode="json", exclude={"use_cache"}), "seed": r.exp.seed}

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        from tunelab.evaluate import page

        r = ctx.r
        cfg = eval_config(r, r.prompts, [_model_cfg(r, "base")])
        (ctx.out / "configs").mkdir(parents=True, exist_ok=True)
        (ctx.out / "configs" / "eval.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")
        ctx.log(f"eval: {len(r.prompts)} prompt(s) on {r.eval_data.name} with {r.model}")
        summary, rows = _run_eval(ctx, cfg, d)
        page.write(d / "report.html", summary, rows, title=f"{r.name}: prompts")
        release_models()
        result = EvalStageResult(best=summary.best.variant if summary.best else None, n_items=summary.n_items,
                                 task=summary.task, accuracy={c.variant: c.metrics.get("accuracy")
                                                              for c in summary.cells})
        return Outcome(_rows_hash(rows), result, tokens=_tokens(rows))


# --------------------------------------------------------------------------------------------------
# generate: teacher data
# --------------------------------------------------------------------------------------------------
class GenerateStage:
    """Teacher data with `tunelab generate`. With ``generate.inputs: train`` the teacher labels the texts of
    data.train (only the fields its prompt reads: never a gold label) and the stage scores the kept labels against
    the withheld gold ones; with ``generate.serve`` the teacher is the base model behind `tunelab serve`."""

    key = "generate"
    SERVED = "tunelab-served"  # the teacher's model name when the stage serves the base model (or a tuned one)

    def __init__(self, teacher: TrainStage | None = None):
        self.teacher = teacher  # generate.serve: METHOD: that method's tuned model labels
        self.deps: tuple[str, ...] = (teacher.key,) if teacher is not None else ()

    def _config(self, ctx: Ctx, d: Path | None = None) -> dict:
        from tunelab.run.resolve import load_generate_dict

        cfg = load_generate_dict(ctx.r)
        g = ctx.r.exp.generate
        assert g is not None
        if g.inputs == "train":
            cfg["data"] = {"path": str(d / "texts.jsonl") if d is not None else "<texts of data.train>",
                           "id_field": "id"}
        elif g.exclude_gold and isinstance(cfg.get("data"), dict) and cfg.get("pipeline") in ("label", "respond"):
            gold = [str(p) for p in (ctx.r.train_data, ctx.r.eval_data) if p is not None]
            cfg["data"]["exclude"] = list(dict.fromkeys([*(cfg["data"].get("exclude") or []), *gold]))
        if g.serve:  # the URL is known once the server is up; the config hashes without it
            teacher = cfg.get("teacher") or {}
            cfg["teacher"] = {**{k: v for k, v in teacher.items() if k not in ("api_key_env", "api_key_file")},
                              "model": self.SERVED, "base_url": "<tunelab serve on 127.0.0.1>",
                              "price": {"input": 0.0, "output": 0.0},
                              "timeout_s": max(float(teacher.get("timeout_s") or 0), 300.0)}
        return cfg

    def inputs(self, ctx: Ctx) -> dict:
        cfg = _by_content(self._config(ctx))  # input files by their bytes: a moved experiment stays cached
        g = ctx.r.exp.generate
        extra: dict[str, Any] = {}
        if g is not None and g.inputs == "train":
            assert ctx.r.train_data is not None
            extra["train"] = {"data": file_sha(ctx.r.train_data), "limit": self._train_limit(ctx),
                              "id_field": ctx.r.exp.data.id_field}
        if g is not None and g.serve:
            extra["served_model"] = (ctx.upstream(self.teacher.key).output_hash if self.teacher is not None
                                     else model_identity(ctx.r.model))
        return {"config": cfg, "limit": self._limit(ctx), **extra}

    def _limit(self, ctx: Ctx) -> int | None:
        g = ctx.r.exp.generate
        lims = [x for x in (g.limit if g else None, ctx.r.limit) if x is not None]
        return min(lims) if lims else None

    def _train_limit(self, ctx: Ctx) -> int | None:
        lims = [x for x in (ctx.r.exp.data.train_limit, self._limit(ctx)) if x is not None]
        return min(lims) if lims else None

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        from tunelab.generate.results import GenerateStats
        from tunelab.generate.runner import RunOptions, run_generate

        g = ctx.r.exp.generate
        assert g is not None
        d.mkdir(parents=True, exist_ok=True)
        cfg = self._config(ctx, d)
        gold = self._write_texts(ctx, cfg, d) if g.inputs == "train" else None
        srv = None
        try:
            if g.serve:
                srv = self._serve(ctx)
                cfg["teacher"]["base_url"] = srv.url + "/v1"
            path = ctx.out / "configs" / "generate.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
            ctx.log(f"generate: {cfg.get('pipeline')} with teacher {(cfg.get('teacher') or {}).get('model')}"
                    + (" (resuming from the journal)" if resume else ""))
            stats = run_generate(path, RunOptions(out=d, limit=self._limit(ctx)))
        finally:
            if srv is not None:
                srv.stop()
                release_models()
        assert isinstance(stats, GenerateStats)
        if stats.pending:
            raise TunelabError(f"generate: {stats.pending} inputs are still pending (failed requests or the "
                               f"budget); rerun `tunelab run` to finish them")
        agreement = self._agreement(cfg, stats, gold) if gold is not None else None
        if agreement is not None:
            agreement.write(d / "agreement.json")
            ctx.log(f"generate: the teacher agrees with gold on {agreement.agree} of {agreement.n} kept texts "
                    f"({agreement.accuracy.value:.1%}), Cohen's kappa {agreement.kappa:.3f}")
        return Outcome(file_sha(stats.data_path), GenerateStageResult(
            data=stats.data_path, kept=stats.kept, dropped=stats.dropped.total, teacher=stats.teacher.model,
            cost_usd=stats.cost_usd, agreement=agreement), tokens=stats.tokens.prompt + stats.tokens.completion,
            teacher_usd=stats.cost_usd)

    def _write_texts(self, ctx: Ctx, cfg: dict, d: Path) -> dict[str, str | None]:
        """OUT/generate/texts.jsonl: the id and the fields the teacher's prompt reads of each training item; returns
        the gold label of each id (what the teacher must not see)."""
        from tunelab.data.io import read_records, write_jsonl
        from tunelab.prompts import load_prompt_spec

        spec = load_prompt_spec(cfg["prompt"])
        fields = spec.input_fields()
        assert ctx.r.train_data is not None
        items = read_records(ctx.r.train_data, limit=self._train_limit(ctx))
        texts, gold = [], {}
        for k, it in enumerate(items):
            iid = item_id(it, k, ctx.r.exp.data.id_field)
            where = f"{ctx.r.train_data}:{it.get('_line', k + 1)}"
            if iid in gold:
                raise DataError(f"duplicate id {iid!r}", where=where)
            missing = [f for f in fields if f not in it]
            if missing:
                raise DataError(f"the teacher's prompt reads {missing[0]!r}, which this item lacks", where=where)
            gold[iid] = spec.gold(it)
            texts.append({"id": iid, **{f: it[f] for f in fields}})
        write_jsonl(d / "texts.jsonl", texts)
        return gold

    @staticmethod
    def _agreement(cfg: dict, stats, gold: dict[str, str | None]):
        """The kept teacher labels against the withheld gold labels of the same texts."""
        from tunelab.data.io import read_records
        from tunelab.generate.compare import agreement
        from tunelab.generate.pipelines import spec_label_field
        from tunelab.prompts import load_prompt_spec

        spec = load_prompt_spec(cfg["prompt"])
        lf = spec_label_field(spec)
        rows = [r for r in read_records(stats.data_path) if gold.get(str(r["id"])) is not None]
        return agreement([str(gold[str(r["id"])]) for r in rows], [str(r[lf]) for r in rows],
                         list(spec.labels or []))

    def _serve(self, ctx: Ctx):
        from tunelab.serve.app import ServerThread, build_app
        from tunelab.serve.config import ServeConfig

        r = ctx.r
        model, adapters, name = r.model, {}, self.SERVED
        if self.teacher is not None:
            tr = ctx.upstream_result(self.teacher.key, TrainStageResult)
            if tr.kind == "adapter":
                model, adapters, name = tr.started_from(r.model), {self.SERVED: tr.artifact}, "base"
            else:
                model = tr.artifact
            ctx.log(f"generate: serving {self.teacher.plan.entry.name} ({tr.artifact}) as the teacher "
                    f"{self.SERVED!r} on 127.0.0.1")
        else:
            ctx.log(f"generate: serving the base model ({r.model}) as the teacher {self.SERVED!r} on 127.0.0.1")
        release_models()
        app = build_app(ServeConfig(model=None if model == "bundled" else model, served_model_name=name,
                                    adapters=adapters, max_batch=32))
        return ServerThread(app, port=0).start(timeout=300)


def _drop_reasons(d: Path) -> str:
    """'dropped: low_confidence 32, ...' from a generate folder's stats.json."""
    from tunelab.generate.results import GenerateStats

    try:
        by = GenerateStats.read(d / "stats.json").dropped.by_reason
    except TunelabError:
        return "see its stats.json"
    return "dropped: " + (", ".join(f"{k} {v}" for k, v in by.items()) or "none")


def item_id(item: dict, index: int, id_field: str | None) -> str:
    """An item's id: its ``id_field`` (default ``id``) when it has one, else ``line<N>`` (its line in the file)."""
    f = id_field or "id"
    return str(item[f]) if f in item else f"line{item.get('_line', index + 1)}"


def _by_content(obj: Any) -> Any:
    """``obj`` with every absolute path of a file replaced by the file's content hash."""
    if isinstance(obj, dict):
        return {k: _by_content(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_by_content(v) for v in obj]
    if isinstance(obj, str) and Path(obj).is_absolute() and Path(obj).is_file():
        return f"sha256:{file_sha(obj)}"
    return obj


# --------------------------------------------------------------------------------------------------
# vocab: the experiment's model with a vocabulary for the domain's text
# --------------------------------------------------------------------------------------------------
class VocabStage:
    key = "vocab"
    deps: tuple[str, ...] = ()

    def inputs(self, ctx: Ctx) -> dict:
        v = ctx.r.exp.vocab
        assert v is not None and ctx.r.vocab_data is not None
        return {"model": model_identity(ctx.r.model), "data": file_sha(ctx.r.vocab_data),
                "settings": v.model_dump(mode="json", exclude={"data"})}

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        from tunelab.vocab.config import VocabConfig
        from tunelab.vocab.extend import extend_vocab

        v, r = ctx.r.exp.vocab, ctx.r
        assert v is not None and r.vocab_data is not None
        if d.exists():
            shutil.rmtree(d)
        ctx.log(f"vocab: {v.add} tokens learnt from {r.vocab_data.name} added to {r.model}")
        cfg = VocabConfig(model=r.model, **v.model_dump(exclude={"data"}))
        rep = extend_vocab(r.vocab_data, d / "model", cfg, log=ctx.log)
        ctx.log(f"vocab: tokens per text {rep.tokens_per_text_before:.1f} -> {rep.tokens_per_text_after:.1f} "
                f"({rep.texts} texts), vocabulary {rep.base_vocab_size} -> {rep.vocab_size}")
        return Outcome(dir_sha(d / "model"), VocabStageResult(
            model=str(d / "model"), added=rep.added, vocab_size=rep.vocab_size,
            tokens_per_text_before=rep.tokens_per_text_before, tokens_per_text_after=rep.tokens_per_text_after,
            texts=rep.texts, seconds=rep.seconds))


# --------------------------------------------------------------------------------------------------
# train: one method
# --------------------------------------------------------------------------------------------------
class TrainStage:
    def __init__(self, plan: MethodPlan):
        self.plan = plan
        self.key = f"train/{plan.entry.name}"
        deps = []
        if "generated" in (plan.entry.data, plan.entry.items, *plan.entry.mix):
            deps.append("generate")
        if plan.prompt == "best":
            deps.append("eval")
        start = plan.entry.model
        self.start = None if start == "base" else ("vocab" if start == "vocab" else f"train/{start}")
        if self.start is not None:
            deps.append(self.start)
        self.deps = tuple(deps)

    @property
    def pretrain(self) -> bool:
        return self.plan.method == "pretrain"

    def base_model(self, ctx: Ctx) -> str:
        """The model it starts from: the experiment's, the vocab stage's, or the one an earlier method wrote."""
        if self.start is None:
            return ctx.r.model
        if self.start == "vocab":
            return ctx.upstream_result("vocab", VocabStageResult).model
        return ctx.upstream_result(self.start, TrainStageResult).artifact

    # -- what it trains on --
    def prompt_ref(self, ctx: Ctx) -> PromptRef:
        if self.plan.prompt == "best":
            best = ctx.upstream_result("eval", EvalStageResult).best
            if best is None:
                raise TunelabError("prompt: best needs a best prompt, and the eval data has no gold answers")
            return ctx.r.prompts[best]
        assert self.plan.prompt_ref is not None
        return self.plan.prompt_ref

    def source_path(self, ctx: Ctx, d: str | None = None) -> Path:
        """The file the method's data comes from (data: gold, generated or a file; ``d``: one of its mix:)."""
        d = d or self.plan.entry.data
        if d == "gold":
            assert ctx.r.train_data is not None
            return ctx.r.train_data
        if d == "generated":
            g = ctx.upstream_result("generate", GenerateStageResult)
            if g.kept == 0:
                raise DataError(f"train.{self.plan.entry.name}: the generate stage kept none of the teacher's rows, so "
                                f"there is nothing to train on ({_drop_reasons(Path(g.data).parent)}; lower "
                                "quality.min_confidence, or use a stronger teacher)", where=g.data)
            return Path(g.data)
        p = Path(d).expanduser()
        return p if p.is_absolute() else (ctx.r.base_dir / p).resolve()

    def data_path(self, ctx: Ctx) -> Path:
        """What it trains on: the source, or with ``items: generated`` the source's rows of the items the generate
        stage kept, in its order (written to OUT/train_data/NAME.jsonl)."""
        src = self.source_path(ctx)
        if self.plan.entry.items != "generated":
            return src
        from tunelab.data.io import read_records, write_jsonl

        kept = [str(r.get("id")) for r in read_records(ctx.upstream_result("generate", GenerateStageResult).data)]
        by_id = {item_id(it, k, ctx.r.exp.data.id_field): it for k, it in enumerate(read_records(src))}
        missing = [i for i in kept if i not in by_id]
        if missing:
            raise DataError(f"items: generated: the generate stage kept item {missing[0]!r}, which is not in this "
                            "method's data", where=str(src))
        out = ctx.out / "train_data" / f"{self.plan.entry.name}.jsonl"
        write_jsonl(out, ({k: v for k, v in by_id[i].items() if not k.startswith("_")} for i in kept))
        return out

    def _prompt_file(self, ctx: Ctx, ref: PromptRef) -> Path:
        if ref.path is not None:
            return ref.path
        f = ctx.out / "prompts" / f"{ref.name}.yaml"  # written at the start of the run
        if not f.is_file():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(yaml.safe_dump(ref.spec.resolved_dict(), allow_unicode=True, sort_keys=False),
                         encoding="utf-8")
        return f

    def config(self, ctx: Ctx, d: Path | None = None):
        from tunelab.run.resolve import check_train_dict

        data = dict(self.plan.base_data)
        path = self.data_path(ctx) if d is not None else self.source_path(ctx)  # (only a run writes a file)
        data["data"] = {**data["data"], "path": str(path)}
        if not self.pretrain:
            data["data"]["prompt"] = str(self._prompt_file(ctx, self.prompt_ref(ctx))) if d is not None else "x.yaml"
        if self.plan.entry.mix:  # each through the same prompt (and format) as data
            data["data"]["mix"] = [{k: v for k, v in {"path": str(self.source_path(ctx, m)) if d is not None else "-",
                                                      "format": data["data"].get("format"),
                                                      "prompt": data["data"].get("prompt")}.items() if v is not None}
                                   for m in self.plan.entry.mix]
        data["out"] = str(d) if d is not None else "-"
        data["model"] = self.base_model(ctx) if d is not None else ctx.r.model
        return check_train_dict(ctx.r, self.plan, data)

    def inputs(self, ctx: Ctx) -> dict:
        cfg = self.config(ctx).model_dump(mode="json")
        cfg.pop("out")
        cfg["data"].pop("prompt", None)
        cfg["data"]["path"] = file_sha(self.source_path(ctx))  # (items: generated: + the generate stage's output)
        for m, src in zip(cfg["data"].get("mix") or [], self.plan.entry.mix):
            m.pop("prompt", None)
            m["path"] = src if src == "generated" else file_sha(self.source_path(ctx, src))
        if cfg.get("forgetting") and cfg["forgetting"].get("data"):
            cfg["forgetting"]["data"] = file_sha(cfg["forgetting"]["data"])
        cfg["model"] = model_identity(ctx.r.model) if self.start is None else None  # else: the upstream's output
        return {"config": cfg, "prompt": None if self.pretrain else self.prompt_ref(ctx).hash,
                "upstream": {k: ctx.upstream(k).output_hash for k in self.deps if k != "eval"}}

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        from tunelab.train.checkpoint import latest_checkpoint
        from tunelab.train.results import TrainReport
        from tunelab.train.recipes import recipe

        resume = resume and latest_checkpoint(d) is not None
        if not resume and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.config(ctx, d)
        (ctx.out / "configs").mkdir(parents=True, exist_ok=True)
        (ctx.out / "configs" / f"train_{self.plan.entry.name}.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False), encoding="utf-8")
        ref = None if self.pretrain else self.prompt_ref(ctx)
        ctx.log(f"train {self.plan.entry.name}: {cfg.method} on {Path(cfg.data.path).name}"
                + (f" with prompt {ref.name}" if ref is not None else "")
                + (f", from {self.plan.entry.model} ({cfg.model})" if self.start is not None else "")
                + (" (resuming from the latest checkpoint)" if resume else ""))
        release_models()
        rep = recipe(cfg.method).run(cfg, resume=resume, log=ctx.log, console=ctx.console)
        release_models()
        assert isinstance(rep, TrainReport)
        artifact = Path(rep.artifact)
        weights = sorted(artifact.glob("*.safetensors"))
        out_hash = stable_hash([file_sha(w) for w in weights]) if weights else dir_sha(artifact)
        return Outcome(out_hash, TrainStageResult(
            method=cfg.method, artifact=str(artifact), kind=rep.artifact_kind, base_model=cfg.model,
            prompt=ref.name if ref is not None else None, prompt_hash=ref.hash if ref is not None else None,
            data=cfg.data.path, examples=rep.data.examples, steps=rep.steps, resumed_from=rep.resumed_from,
            tokens=rep.tokens, train_seconds=rep.train_seconds, tok_s=rep.tok_s, peak_rss_gb=rep.peak_rss_gb,
            trainable=rep.parameters.trainable, total_params=rep.parameters.total, loss_first=rep.loss.first,
            loss_last=rep.loss.last, lr=cfg.optim.lr, epochs=cfg.train.epochs,
            lora_r=cfg.lora.r if cfg.method == "lora" else None, forgetting=rep.forgetting), tokens=rep.tokens)


# --------------------------------------------------------------------------------------------------
# eval_after: tuned models vs the best prompt, same items, paired
# --------------------------------------------------------------------------------------------------
def paired(a_rows: list[EvalRow], b_rows: list[EvalRow], *, seed: int, confidence: float) -> PairedComparison:
    """B vs A on the items both scored (sample 0): tunelab.stats.paired_comparison of their outcomes."""
    from tunelab.stats import paired_comparison

    def outcomes(rows: list[EvalRow]) -> dict[str, bool]:
        return {r.item_id: bool(r.correct) for r in rows if r.sample == 0 and r.correct is not None}

    return paired_comparison(outcomes(a_rows), outcomes(b_rows), seed=seed, confidence=confidence)


class EvalAfterStage:
    key = "eval_after"

    def __init__(self, trains: list[TrainStage]):
        self.trains = [t for t in trains if t.plan.scored]
        self.deps = ("eval", *(t.key for t in self.trains))

    def _eval_prompt(self, ctx: Ctx, t: TrainStage) -> PromptRef:
        p = ctx.r.exp.eval_after.prompt
        return t.prompt_ref(ctx) if p == "train" else ctx.r.prompts[p]

    def inputs(self, ctx: Ctx) -> dict:
        r = ctx.r
        return {"model": model_identity(r.model), "data": file_sha(r.eval_data), "limit": eval_limit(r),
                "settings": r.exp.eval.model_dump(mode="json", exclude={"use_cache"}), "seed": r.exp.seed,
                "prompts": {t.plan.entry.name: self._eval_prompt(ctx, t).hash for t in self.trains},
                "compare": [list(p) for p in r.exp.eval_after.compare],
                "upstream": {k: ctx.upstream(k).output_hash for k in self.deps}}

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        from tunelab.evaluate.results import read_rows, write_rows
        from tunelab.evaluate.metrics import summarize_cell
        from tunelab.stats import paired_sentence, with_holm

        r = ctx.r
        conf, seed = r.exp.eval.confidence, r.exp.seed
        base_rows = read_rows(ctx.out / "eval" / "results.jsonl")
        best = ctx.upstream_result("eval", EvalStageResult).best
        if best is None:
            raise TunelabError("eval_after needs a best prompt, and the eval data has no gold answers")
        best_rows = [x for x in base_rows if x.variant == best]
        all_rows: list[EvalRow] = []
        tuned_rows: dict[str, list[EvalRow]] = {}
        evals: dict[str, dict[str, Any]] = {}
        for t in self.trains:
            name = t.plan.entry.name
            tr = ctx.upstream_result(t.key, TrainStageResult)
            ref = self._eval_prompt(ctx, t)
            artifact = Path(tr.artifact)
            tuned = (_model_cfg(r, name, adapter=artifact, model=tr.started_from(r.model)) if tr.kind == "adapter"
                     else _model_cfg(r, name, model=str(artifact)))
            same = next((n for n, p in r.prompts.items() if p.hash == ref.hash), None)
            models = [tuned] if same is not None else [_model_cfg(r, "base"), tuned]
            variant = same or ref.name
            cfg = eval_config(r, {variant: ref}, models)
            ctx.log(f"eval_after {name}: {tr.kind} with prompt {variant} on {r.eval_data.name}")
            summary, rows = _run_eval(ctx, cfg, d / name)
            release_models()
            mine = tuned_rows[name] = [x for x in rows if x.model == name]
            before = ([x for x in base_rows if x.variant == same] if same is not None
                      else [x for x in rows if x.model == "base"])
            cell = summarize_cell(mine, summary.task, summary.labels, confidence=conf, seed=seed)
            evals[name] = {"method": tr.method, "prompt": variant, "prompt_hash": ref.hash, "artifact": str(artifact),
                           "metrics": cell.metrics, "n_items": cell.n_items, "tokens": cell.tokens,
                           "vs_best": paired(best_rows, mine, seed=seed, confidence=conf),
                           "vs_before": paired(before, mine, seed=seed, confidence=conf),
                           "baselines": {"vs_best": best, "vs_before": f"{variant} (base model)"}}
            all_rows += rows
        names = list(evals)
        for key in ("vs_best", "vs_before"):  # Holm over the methods, each family on its own
            for n, c in zip(names, with_holm([evals[n][key] for n in names])):
                evals[n][key] = VsBaseline(**dict(c), baseline=evals[n]["baselines"][key])
        methods = {n: MethodEval(**{k: v for k, v in e.items() if k != "baselines"}) for n, e in evals.items()}
        pairs = r.exp.eval_after.compare  # tuned models head to head, Holm over the pairs
        head = with_holm([paired(tuned_rows[a], tuned_rows[b], seed=seed, confidence=conf) for a, b in pairs])
        pair_results = [PairComparison(**dict(c), baseline=a, model=b) for (a, b), c in zip(pairs, head)]
        for pc in pair_results:
            ctx.log(f"eval_after: {paired_sentence(pc.model, pc.baseline, pc)}")
        write_rows(d / "results.jsonl", all_rows)
        EvalAfterSummary(best_prompt=best, confidence=conf, methods=methods, pairs=pair_results).write(
            d / "summary.json")
        return Outcome(_rows_hash(all_rows), EvalAfterStageResult(methods={
            n: MethodHeadline(accuracy=m.metrics.get("accuracy"), vs_best=m.vs_best) for n, m in methods.items()},
            pairs=pair_results), tokens=_tokens(all_rows))


# --------------------------------------------------------------------------------------------------
# serve: the base model + the adapters behind the OpenAI-compatible server
# --------------------------------------------------------------------------------------------------
class ServeStage:
    key = "serve"

    def __init__(self, trains: list[TrainStage]):
        self.trains = trains
        self.deps = tuple(t.key for t in trains)

    def inputs(self, ctx: Ctx) -> dict:
        s = ctx.r.exp.serve
        return {"model": model_identity(ctx.r.model), "settings": s.model_dump(mode="json") if s else None,
                "upstream": {k: ctx.upstream(k).output_hash for k in self.deps}}

    def run(self, ctx: Ctx, d: Path, resume: bool) -> Outcome:
        r, s = ctx.r, ctx.r.exp.serve
        assert s is not None
        adapters, others, elsewhere = {}, {}, {}
        for t in self.trains:
            tr = ctx.upstream_result(t.key, TrainStageResult)
            if tr.kind == "model":
                others[t.plan.entry.name] = tr.artifact
            elif tr.started_from(r.model) == r.model:
                adapters[t.plan.entry.name] = tr.artifact
            else:  # an adapter of the vocab stage's or an earlier method's model: served over that model
                elsewhere.setdefault(tr.started_from(r.model), {})[t.plan.entry.name] = tr.artifact
        model_flag = "" if r.model == "bundled" else f" --model {r.model}"
        cmd = "tunelab serve" + model_flag + "".join(f" --adapter {n}={p}" for n, p in adapters.items())
        cmds = [cmd] + [f"tunelab serve --model {p} --served-model-name {n}" for n, p in others.items()]
        cmds += [f"tunelab serve --model {b}" + "".join(f" --adapter {n}={p}" for n, p in group.items())
                 for b, group in elsewhere.items()]
        d.mkdir(parents=True, exist_ok=True)
        (d / "command.txt").write_text("\n".join(cmds) + "\n", encoding="utf-8")
        result = ServeStageResult(mode=s.mode, commands=cmds)
        if s.mode == "smoke":
            result.smoke = self._smoke(ctx, adapters, s.max_tokens)
            result.smoke.write(d / "smoke.json")
        return Outcome(stable_hash(result.to_json()), result)

    def _smoke(self, ctx: Ctx, adapters: dict[str, str], max_tokens: int) -> SmokeTest:
        """Start the server in this process, ask each served model one question through the openai client
        (the first eval item, rendered with the best prompt), stop."""
        from openai import OpenAI

        from tunelab.data.io import read_records, iter_strip_private
        from tunelab.serve.app import ServerThread, build_app
        from tunelab.serve.config import ServeConfig

        r = ctx.r
        item = next(iter_strip_private(read_records(r.eval_data, limit=1)))
        ev = ctx.done.get("eval")
        best = (ev.result.best if ev is not None and isinstance(ev.result, EvalStageResult) else None) \
            or next(iter(r.prompts))
        messages = r.prompts[best].spec.render(item)
        cfg = ServeConfig(model=None if r.model == "bundled" else r.model, adapters=adapters, port=0,
                          max_batch=4, default_max_tokens=max_tokens)
        release_models()
        app = build_app(cfg)
        base_id = app.state.serving.base_id
        answers = []
        with ServerThread(app, port=0) as srv:
            client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            served = [m.id for m in client.models.list().data]
            for name in [base_id, *adapters]:
                t0 = time.perf_counter()
                resp = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                      temperature=0)
                answers.append(ServeAnswer(model=name, answer=resp.choices[0].message.content,
                                           finish_reason=resp.choices[0].finish_reason,
                                           completion_tokens=resp.usage.completion_tokens if resp.usage else None,
                                           latency_s=round(time.perf_counter() - t0, 3)))
                ctx.log(f"serve: {name} answered {answers[-1].answer!r} in {answers[-1].latency_s:.2f}s")
        release_models()
        return SmokeTest(ok=True, served_models=served, prompt=best, item_id=str(item.get("id", 0)),
                         gold=r.prompts[best].spec.gold(item), answers=answers)
