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
from tunelab.errors import ConfigError
from tunelab.run.config import ResolvedExperiment, load_experiment
from tunelab.run.stages import Ctx, EvalAfterStage, EvalStage, GenerateStage, ServeStage, TrainStage
from tunelab.run.util import PeakRss, Timer, environment, now, read_json, stable_hash, write_json

STATE = "run.json"


def stage_dir(out: Path, key: str) -> Path:
    return out.joinpath(*key.split("/"))


def plan_stages(r: ResolvedExperiment) -> list:
    stages: list = [EvalStage()]
    if r.exp.generate is not None:
        stages.append(GenerateStage())
    trains = [TrainStage(m) for m in r.methods]
    stages += trains
    if trains:
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


def load_state(out: Path) -> dict[str, Any]:
    p = out / STATE
    if p.is_file():
        try:
            st = read_json(p)
            if isinstance(st, dict) and isinstance(st.get("stages"), dict):
                return st
        except ValueError:
            pass
    return {"stages": {}}


def run_experiment(path: str | Path, *, out: Path | None = None, force: Iterable[str] = (),
                   only: Iterable[str] = (), limit: int | None = None, log: Callable[[str], None] | None = _stderr,
                   progress: Callable | None = None, console: Any = None,
                   on_stage: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
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
    state.update({"name": r.name, "experiment": str(path.resolve()), "tunelab": __version__,
                  "created": state.get("created") or now(), "updated": now(), "limit": limit,
                  "invocations": int(state.get("invocations", 0)) + 1, "stage_order": keys})
    # stages that are no longer in the experiment (a method removed) are forgotten; their folders stay
    state["stages"] = {k: v for k, v in state["stages"].items() if k in keys}
    for v in state["stages"].values():
        v["action"] = None

    def save() -> None:
        state["updated"] = now()
        write_json(out / STATE, state)

    save()
    ctx = Ctx(r, out, logger, progress=progress, console=console)
    for st in stages:
        prev = state["stages"].get(st.key)
        if only_set is not None and st.key not in only_set:
            if prev is not None:
                prev["action"] = "skipped"
                if prev.get("status") == "done":
                    ctx.done[st.key] = prev
                save()
            continue
        logger.stage = st.key
        h = stable_hash({"stage": st.key, "tunelab": __version__, "inputs": st.inputs(ctx)})
        d = stage_dir(out, st.key)
        if (st.key not in forced and prev is not None and prev.get("status") == "done" and prev.get("hash") == h
                and d.exists()):
            prev["action"] = "cached"
            ctx.done[st.key] = prev
            save()
            if on_stage:
                on_stage(st.key, prev)
            continue
        resume = (st.key not in forced and prev is not None and prev.get("hash") == h
                  and prev.get("status") in ("running", "interrupted", "failed"))
        if not resume and d.exists() and st.key != "train" and not st.key.startswith("train/"):
            shutil.rmtree(d)  # (a train stage clears its own folder: it decides whether a checkpoint resumes)
        entry = {"status": "running", "hash": h, "started": now(), "action": "resumed" if resume else "ran"}
        state["stages"][st.key] = entry
        save()
        try:
            with PeakRss() as rss, Timer() as timer:
                outcome = st.run(ctx, d, resume)
        except KeyboardInterrupt:
            entry.update(status="interrupted", finished=now())
            save()
            raise
        except BaseException as e:
            entry.update(status="failed", finished=now(), error=f"{type(e).__name__}: {e}")
            save()
            raise
        entry.update(status="done", finished=now(), output_hash=outcome.output_hash, result=outcome.result,
                     cost={"wall_s": round(timer.s, 2), "peak_rss_mb": rss.mb, "tokens": outcome.tokens,
                           "teacher_usd": outcome.teacher_usd})
        entry.pop("error", None)
        ctx.done[st.key] = entry
        save()
        if on_stage:
            on_stage(st.key, entry)
    logger.stage = None

    from tunelab.run.report import build_summary, write_run_report

    summary = build_summary(out, state, r)
    write_json(out / "summary.json", summary)
    write_run_report(out / "report.html", summary, out)
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
