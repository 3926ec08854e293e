"""`tunelab compare RUN_A RUN_B`: what differs between two run folders, in the order that matters —
the headline, the metrics per prompt and per tuned model, the configuration, the environment, the stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.results import read_json_file
from tunelab.run.results import RunState, RunSummary
from tunelab.stats import Interval, format_p

SKIP_ENV = ("git.experiment",)


@dataclass
class RunFolder:
    state: RunState
    summary: RunSummary
    resolved: dict[str, Any]   # resolved.json: the experiment with every default filled in
    env: dict[str, Any]        # env.json


def load_run(path: Path) -> RunFolder:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"no such run folder: {p}")
    for name in ("run.json", "summary.json", "resolved.json", "env.json"):
        if not (p / name).is_file():
            raise ConfigError(f"not a `tunelab run` folder: {name} is missing (run `tunelab run EXPERIMENT.yaml "
                              f"--out {p}` first)", where=str(p))
    return RunFolder(RunState.read(p / "run.json"), RunSummary.read(p / "summary.json"),
                     read_json_file(p / "resolved.json"), read_json_file(p / "env.json"))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "name" in x for x in obj):
        for x in obj:
            out.update(flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}{x['name']}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def _pct(m: Interval | None) -> str:
    return "-" if not m else f"{m.value * 100:.1f}"


def _delta(a: Interval | None, b: Interval | None) -> str:
    if not a or not b:
        return ""
    return f"{(b.value - a.value) * 100:+.1f}"


def compare_runs(a_dir: Path, b_dir: Path) -> list[tuple[str, list[tuple[str, ...]]]]:
    """Sections of rows: (title, [(what, A, B, delta or note), ...]); empty sections are left out."""
    a, b = load_run(a_dir), load_run(b_dir)
    sa, sb = a.summary, b.summary
    sections: list[tuple[str, list[tuple[str, ...]]]] = []

    head = [("verdict", sa.verdict.text, sb.verdict.text, "")]
    ba, bb = sa.best_prompt, sb.best_prompt
    head.append(("best prompt", f"{ba.variant if ba else '-'} {_pct(ba.accuracy if ba else None)}",
                 f"{bb.variant if bb else '-'} {_pct(bb.accuracy if bb else None)}",
                 _delta(ba.accuracy if ba else None, bb.accuracy if bb else None)))
    sections.append(("headline", head))

    pa = {p.variant: p for p in sa.prompts or []}
    pb = {p.variant: p for p in sb.prompts or []}
    rows = []
    for v in list(pa) + [x for x in pb if x not in pa]:
        x, y = pa.get(v), pb.get(v)
        ax, ay = x.accuracy if x else None, y.accuracy if y else None
        note = _delta(ax, ay)
        if x and y and x.spec_hash and y.spec_hash and x.spec_hash != y.spec_hash:
            note += " (prompt changed)"
        rows.append((f"prompt {v}: accuracy %", _pct(ax), _pct(ay), note))
    sections.append(("prompts (base model)", rows))

    ma = {m.name: m for m in sa.methods}
    mb = {m.name: m for m in sb.methods}
    rows = []
    for n in list(ma) + [x for x in mb if x not in ma]:
        x, y = ma.get(n), mb.get(n)
        ax, ay = x.accuracy if x else None, y.accuracy if y else None
        rows.append((f"{n}: accuracy %", _pct(ax), _pct(ay), _delta(ax, ay)))
        if (x and x.evaluated) or (y and y.evaluated):
            f = (lambda m: f"{m.vs_best.diff.value * 100:+.1f} (p={format_p(m.vs_best.p)})"
                 if m and m.evaluated else "-")
            rows.append((f"{n}: vs best prompt, points", f(x), f(y), ""))
        tx, ty = (x.train if x else None), (y.train if y else None)
        for k in ("loss_last", "train_seconds", "tok_s"):
            vx, vy = getattr(tx, k, None), getattr(ty, k, None)
            if vx is not None or vy is not None:
                rows.append((f"{n}: {k}", _num(vx), _num(vy), _num_delta(vx, vy)))
    sections.append(("tuned models", rows))

    ca, cb = sa.cost, sb.cost
    rows = [(k, _num(getattr(ca, k)), _num(getattr(cb, k)), _num_delta(getattr(ca, k), getattr(cb, k)))
            for k in ("total_wall_s", "train_wall_s", "total_tokens", "peak_rss_mb", "teacher_usd")
            if getattr(ca, k) != getattr(cb, k)]
    sections.append(("cost", rows))

    ra, rb = flatten(a.resolved.get("experiment")), flatten(b.resolved.get("experiment"))
    ra.update(flatten({"train_config": a.resolved.get("train")}))
    rb.update(flatten({"train_config": b.resolved.get("train")}))
    for flat, folder in ((ra, a), (rb, b)):
        prompts = folder.resolved.get("prompts") or {}
        flat.update(flatten({"prompt_hash": {k: str(v.get("hash"))[:12] for k, v in prompts.items()}}))
    ra["limit"], rb["limit"] = a.resolved.get("limit"), b.resolved.get("limit")
    rows = []
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k) == rb.get(k):
            continue
        if k.startswith("train_config."):  # the method's merged train config: only what the experiment does not show
            name, _, rest = k.removeprefix("train_config.").partition(".config.")
            twin = f"train.{name}.{rest}"
            if (ra.get(twin), rb.get(twin)) == (ra.get(k), rb.get(k)):
                continue
        rows.append((k, _short(ra.get(k)), _short(rb.get(k)), ""))
    sections.append(("configuration", rows))

    ea, eb = flatten(a.env), flatten(b.env)
    rows = [(k, _short(ea.get(k)), _short(eb.get(k)), "") for k in sorted(set(ea) | set(eb))
            if ea.get(k) != eb.get(k) and not k.startswith(SKIP_ENV)]
    sections.append(("environment", rows))

    sta, stb = a.state.stages, b.state.stages
    rows = []
    for k in list(sta) + [x for x in stb if x not in sta]:
        x, y = sta.get(k), stb.get(k)
        hx, hy = (x.hash if x else None), (y.hash if y else None)
        if hx != hy or (x and x.status) != (y and y.status):
            rows.append((k, f"{x.status if x else '-'} {(hx or '')[:10]}",
                         f"{y.status if y else '-'} {(hy or '')[:10]}", "same inputs" if hx == hy else "inputs differ"))
    sections.append(("stages", rows))
    return [(t, r) for t, r in sections if r]


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _num_delta(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        d = b - a
        return f"{d:+.4g}" + (f" ({d / a * 100:+.0f}%)" if a else "")
    return ""


def _short(x: Any, n: int = 60) -> str:
    s = "-" if x is None else str(x)
    return s if len(s) <= n else s[: n - 1] + "…"
