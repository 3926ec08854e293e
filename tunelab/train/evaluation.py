"""The before/after eval (the ``eval:`` section): one ``EvalRunner`` scores the base model and the trained one
(and, with a weight average, the last weights) on the same items, compared pairwise (``tunelab.stats``).
"""

from __future__ import annotations

import time
from pathlib import Path
from tunelab.train.results import BeforeAfter
from tunelab.train.session import TrainSession


def before_after_eval(run: TrainSession, artifact: Path, kind: str, last: Path | None = None) -> BeforeAfter | None:
    """Run the same eval config on the base model and on the trained one (one EvalRunner, two models). With a
    weight average (``train.ema_decay``) the last weights (``last``) are a third model, compared with the average
    on the same items (``out["ema"]``: before = last weights, after = average)."""
    e = run.cfg.eval
    if e is None:
        return None
    from tunelab.config import EvalConfig, ModelConfig, validate_as
    from tunelab.evaluate.runner import EvalRunner, load_eval_config
    from tunelab.models import release_models
    from tunelab.stats import paired_comparison

    if e.config:
        cfg = load_eval_config(e.config)
        base_dir = Path(e.config).parent
    else:
        cfg = validate_as(EvalConfig, {"name": "before/after", "data": {"path": e.data},
                                       "variants": {"trained": run.cfg.data.prompt}}, "eval.data")
        base_dir = Path.cwd()
    def trained(name: str, path: Path) -> ModelConfig:
        return (ModelConfig(name=name, model=run.cfg.model, adapter=str(path)) if kind == "adapter"
                else ModelConfig(name=name, model=str(path)))

    models = [ModelConfig(name="before", model=run.cfg.model), trained("after", artifact)]
    if last is not None:
        models.append(trained("last", last))
    cfg = validate_as(EvalConfig, {**cfg.model_dump(), "models": [m.model_dump() for m in models]},
                      e.config or "eval.data")
    t0 = time.perf_counter()
    runner = EvalRunner(cfg, base_dir, run.out / "eval", limit=e.limit, use_cache=True)
    summary, rows = runner.run()
    summary.write(run.out / "eval" / "summary.json")
    release_models()
    out = BeforeAfter(config=e.config or e.data, items=summary.n_items, metric=summary.metric,
                      wall_s=round(time.perf_counter() - t0, 1), ema={} if last is not None else None)
    for variant in sorted({r.variant for r in rows}):
        by = {m.name: {r.item_id: bool(r.correct) for r in rows
                       if r.variant == variant and r.model == m.name and r.sample == 0 and r.correct is not None}
              for m in models}
        out.variants[variant] = paired_comparison(by["before"], by["after"], confidence=cfg.confidence,
                                                  seed=cfg.seed)
        if out.ema is not None:
            out.ema[variant] = paired_comparison(by["last"], by["after"], confidence=cfg.confidence, seed=cfg.seed)
    return out
