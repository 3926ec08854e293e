"""`tunelab run`: the stages of one experiment, each cached by a content hash of its inputs.

A stage's hash covers its resolved settings, the content of its input files, the outputs of the stages it
reads and the tunelab version. A rerun skips every stage whose hash is unchanged and whose folder is still
there, and redoes the rest. A stage that was interrupted (its entry in run.json still says ``running``)
resumes with the same hash: training from its latest checkpoint, generate from its journal, eval from the
call cache. ``run.json`` (written atomically after every change) holds each stage's status, hash, cost and
small result; ``summary.json`` and ``report.html`` are rebuilt from the stage folders at the end.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from tunelab import __version__
from tunelab.errors import ConfigError, TunelabError
from tunelab.run.config import ResolvedExperiment
from tunelab.run.resolve import load_experiment
from tunelab.run.results import RunState, RunSummary, StageCost, StageRecord
from tunelab.run.stages import (Ctx, EvalAfterStage, EvalStage, GenerateStage, ServeStage, TrainStage,
                                VocabStage)
from tunelab.run.util import PeakRss, Timer, environment, now, stable_hash, write_json

STATE = "run.json"


def stage_dir(out: Path, key: str) -> Path:
    return out.joinpath(*key.split("/"))


def plan_stages(r: ResolvedExperiment) -> list:
    stages: list = [EvalStage()]
    g = r.exp.generate
    teacher = g.serve if g is not None and isinstance(g.serve, str) else None
    if g is not None and teacher is None:
        stages.append(GenerateStage())
    if r.exp.vocab is not None:
        stages.append(VocabStage())
    trains = [TrainStage(m) for m in r.methods]
    for t in trains:
        stages.append(t)
        if t.plan.entry.name == teacher:  # its tuned model labels; the methods after it may train on that
            stages.append(GenerateStage(t))
    if any(t.plan.scored for t in trains):
        stages.append(EvalAfterStage(trains))
    if r.exp.serve is not None:
        stages.append(ServeStage(trains))
    return stages


def _select(names: Iterable[str], keys: list[str], flag: str) -> set[str]:
    """Stage names as the user writes them: 'eval', 'train' (every method), 'train/lora', 'eval_after'."""
    chosen: set[str] = set()
    for n in names:
        n = n.strip().replace(":", "/")
        hit = [k for k in keys if k == n or k.startswith(n + "/")]
        if not hit:
            raise ConfigError(f"{flag} {n!r}: no such stage in this experiment; stages: {', '.join(keys)}",
                              where="<command line>")
        chosen.update(hit)
    return chosen


class Logger:
    """Each line goes to the user (stderr), OUT/logs/run.log and the current stage's log file."""

    def __init__(self, out: Path, echo: Callable[[str], None] | None):
        self.dir = out / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.stage: str | None = None

    def __call__(self, msg: str) -> None:
        if self.echo is not None:
            self.echo(msg)
        line = msg if msg.endswith("\n") else msg + "\n"
        with (self.dir / "run.log").open("a", encoding="utf-8") as f:
            f.write(f"{now()} {self.stage or '-'}: {line}")
        if self.stage:
            with (self.dir / (self.stage.replace("/", "_") + ".log")).open("a", encoding="utf-8") as f:
                f.write(line)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_state(out: Path) -> RunState:
    """run.json of an earlier invocation (upgraded from an older schema), or a fresh state when there is none or
    it cannot be read (every stage then runs again)."""
    p = out / STATE
    if p.is_file():
        try:
            return RunState.read(p)
        except TunelabError:
            pass
    return RunState()


def run_experiment(path: str | Path, *, out: Path | None = None, force: Iterable[str] = (),
                   only: Iterable[str] = (), limit: int | None = None, log: Callable[[str], None] | None = _stderr,
                   progress: Callable | None = None, console: Any = None,
                   on_stage: Callable[[str, StageRecord], None] | None = None) -> RunSummary:
    """Run (or resume, or skip what is cached of) one experiment; returns the summary (also in OUT)."""
    path = Path(path)
    r = load_experiment(path, limit=limit)
    out = Path(out) if out is not None else Path("runs") / r.name
    stages = plan_stages(r)
    keys = [s.key for s in stages]
    forced = _select(force, keys, "--force")
    only_set = _select(only, keys, "--only") if only else None

    out.mkdir(parents=True, exist_ok=True)
    logger = Logger(out, log)
    shutil.copyfile(path, out / "experiment.yaml")
    write_json(out / "resolved.json", resolved_dict(r))
    write_prompts(r, out / "prompts")
    write_json(out / "env.json", environment(r.exp.seed, r.base_dir))
    state = load_state(out)
    state = state.model_copy(update={
        "name": r.name, "experiment": str(path.resolve()), "tunelab": __version__, "created": state.created or now(),
        "limit": limit, "invocations": state.invocations + 1, "stage_order": keys,
        # stages that are no longer in the experiment (a method removed) are forgotten; their folders stay
        "stages": {k: v.model_copy(update={"action": None}) for k, v in state.stages.items() if k in keys}})

    def save() -> None:
        state.updated = now()
        state.write(out / STATE)

    save()
    ctx = Ctx(r, out, logger, progress=progress, console=console)
    for st in stages:
        prev = state.stages.get(st.key)
        if only_set is not None and st.key not in only_set:
            if prev is not None:
                prev.action = "skipped"
                if prev.status == "done":
                    ctx.done[st.key] = prev
                save()
            continue
        logger.stage = st.key
        h = stable_hash({"stage": st.key, "tunelab": __version__, "inputs": st.inputs(ctx)})
        d = stage_dir(out, st.key)
        if st.key not in forced and prev is not None and prev.status == "done" and prev.hash == h and d.exists():
            prev.action = "cached"
            ctx.done[st.key] = prev
            save()
            if on_stage:
                on_stage(st.key, prev)
            continue
        resume = (st.key not in forced and prev is not None and prev.hash == h
                  and prev.status in ("running", "interrupted", "failed"))
        if not resume and d.exists() and st.key != "train" and not st.key.startswith("train/"):
            shutil.rmtree(d)  # (a train stage clears its own folder: it decides whether a checkpoint resumes)
        entry = StageRecord(status="running", hash=h, started=now(), action="resumed" if resume else "ran")
        state.stages[st.key] = entry
        save()
        try:
            with PeakRss() as rss, Timer() as timer:
                outcome = st.run(ctx, d, resume)
        except KeyboardInterrupt:
            entry.status, entry.finished = "interrupted", now()
            save()
            raise
        except BaseException as e:
            entry.status, entry.finished, entry.error = "failed", now(), f"{type(e).__name__}: {e}"
            save()
            raise
        entry.status, entry.finished, entry.error = "done", now(), None
        entry.output_hash, entry.result = outcome.output_hash, outcome.result
        entry.cost = StageCost(wall_s=round(timer.s, 2), peak_rss_mb=rss.mb, tokens=outcome.tokens,
                               teacher_usd=outcome.teacher_usd)
        ctx.done[st.key] = entry
        save()
        if on_stage:
            on_stage(st.key, entry)
    logger.stage = None

    from tunelab.run import page
    from tunelab.run.summary import build_summary

    summary = build_summary(out, state, r)
    summary.write(out / "summary.json")
    page.write(out / "report.html", summary, out)
    if r.exp.tracking:
        from tunelab.run.tracking import log_tracking

        log_tracking(r.exp.tracking, out, summary, logger)
    return summary


def write_prompts(r: ResolvedExperiment, folder: Path) -> None:
    """Every prompt as used (few-shot examples drawn and inline), one self-contained YAML per prompt."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, p in r.prompts.items():
        src = f"# prompt {name!r} of {r.path.name}" + (f", from {p.path}" if p.path else " (inline)") + "\n"
        (folder / f"{name}.yaml").write_text(src + yaml.safe_dump(p.spec.resolved_dict(), allow_unicode=True,
                                                                   sort_keys=False), encoding="utf-8")


def resolved_dict(r: ResolvedExperiment) -> dict[str, Any]:
    """The experiment as it runs: every default filled in, paths absolute, prompt specs hashed."""
    return {
        "experiment": r.exp.model_dump(mode="json"), "path": str(r.path), "model": r.model, "limit": r.limit,
        "eval_data": str(r.eval_data), "train_data": str(r.train_data) if r.train_data else None,
        "prompts": {n: {"path": str(p.path) if p.path else None, "hash": p.hash, "task": p.spec.task}
                    for n, p in r.prompts.items()},
        "train": {m.entry.name: {"prompt": m.prompt, "config": m.base_data} for m in r.methods},
    }
