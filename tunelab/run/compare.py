"""`tunelab compare RUN_A RUN_B`: what differs between two run folders, in the order that matters —
the headline, the metrics per prompt and per tuned model, the configuration, the environment, the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.run.util import read_json
from tunelab.stats import format_p

SKIP_ENV = ("git.experiment",)


def load_run(path: Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"no such run folder: {p}")
    files = {}
    for name in ("run.json", "summary.json", "resolved.json", "env.json"):
        f = p / name
        if not f.is_file():
            raise ConfigError(f"not a `tunelab run` folder: {name} is missing (run `tunelab run EXPERIMENT.yaml "
                              f"--out {p}` first)", where=str(p))
        try:
            files[name] = read_json(f)
        except ValueError as e:
            raise ConfigError(f"unreadable JSON ({e})", where=str(f)) from None
    return files


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


def _pct(m: dict | None) -> str:
    return "-" if not m else f"{m['value'] * 100:.1f}"


def _delta(a: dict | None, b: dict | None) -> str:
    if not a or not b:
        return ""
    return f"{(b['value'] - a['value']) * 100:+.1f}"


def compare_runs(a_dir: Path, b_dir: Path) -> list[tuple[str, list[tuple[str, ...]]]]:
    """Sections of rows: (title, [(what, A, B, delta or note), ...]); empty sections are left out."""
    a, b = load_run(a_dir), load_run(b_dir)
    sa, sb = a["summary.json"], b["summary.json"]
    sections: list[tuple[str, list[tuple[str, ...]]]] = []

    head = [("verdict", (sa.get("verdict") or {}).get("text", "-"), (sb.get("verdict") or {}).get("text", "-"), "")]
    ba, bb = sa.get("best_prompt") or {}, sb.get("best_prompt") or {}
    head.append(("best prompt", f"{ba.get('variant', '-')} {_pct(ba.get('accuracy'))}",
                 f"{bb.get('variant', '-')} {_pct(bb.get('accuracy'))}",
                 _delta(ba.get("accuracy"), bb.get("accuracy"))))
    sections.append(("headline", head))

    pa = {p["variant"]: p for p in sa.get("prompts") or []}
    pb = {p["variant"]: p for p in sb.get("prompts") or []}
    rows = []
    for v in list(pa) + [x for x in pb if x not in pa]:
        x, y = pa.get(v, {}), pb.get(v, {})
        note = _delta(x.get("accuracy"), y.get("accuracy"))
        if x.get("spec_hash") and y.get("spec_hash") and x["spec_hash"] != y["spec_hash"]:
            note += " (prompt changed)"
        rows.append((f"prompt {v}: accuracy %", _pct(x.get("accuracy")), _pct(y.get("accuracy")), note))
    sections.append(("prompts (base model)", rows))

    ma = {m["name"]: m for m in sa.get("methods") or []}
    mb = {m["name"]: m for m in sb.get("methods") or []}
    rows = []
    for n in list(ma) + [x for x in mb if x not in ma]:
        x, y = ma.get(n, {}), mb.get(n, {})
        rows.append((f"{n}: accuracy %", _pct(x.get("accuracy")), _pct(y.get("accuracy")),
                     _delta(x.get("accuracy"), y.get("accuracy"))))
        vx, vy = x.get("vs_best") or {}, y.get("vs_best") or {}
        if vx.get("n") or vy.get("n"):
            f = (lambda v: f"{v['diff']['value'] * 100:+.1f} (p={format_p(v['p_value'] if v.get('p_holm') is None else v['p_holm'])})"
                 if v.get("n") else "-")
            rows.append((f"{n}: vs best prompt, points", f(vx), f(vy), ""))
        tx, ty = x.get("train") or {}, y.get("train") or {}
        for k in ("loss_last", "train_seconds", "tok_s"):
            if tx.get(k) is not None or ty.get(k) is not None:
                rows.append((f"{n}: {k}", _num(tx.get(k)), _num(ty.get(k)), _num_delta(tx.get(k), ty.get(k))))
    sections.append(("tuned models", rows))

    ca, cb = sa.get("cost") or {}, sb.get("cost") or {}
    rows = [(k, _num(ca.get(k)), _num(cb.get(k)), _num_delta(ca.get(k), cb.get(k)))
            for k in ("total_wall_s", "train_wall_s", "total_tokens", "peak_rss_mb", "teacher_usd")
            if ca.get(k) != cb.get(k)]
    sections.append(("cost", rows))

    ra, rb = flatten(a["resolved.json"].get("experiment")), flatten(b["resolved.json"].get("experiment"))
    ra.update(flatten({"train_config": a["resolved.json"].get("train")}))
    rb.update(flatten({"train_config": b["resolved.json"].get("train")}))
    ra.update(flatten({"prompt_hash": {k: str(v.get("hash"))[:12] for k, v in
                                       (a["resolved.json"].get("prompts") or {}).items()}}))
    rb.update(flatten({"prompt_hash": {k: str(v.get("hash"))[:12] for k, v in
                                       (b["resolved.json"].get("prompts") or {}).items()}}))
    ra["limit"], rb["limit"] = a["resolved.json"].get("limit"), b["resolved.json"].get("limit")
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

    ea, eb = flatten(a["env.json"]), flatten(b["env.json"])
    rows = [(k, _short(ea.get(k)), _short(eb.get(k)), "") for k in sorted(set(ea) | set(eb))
            if ea.get(k) != eb.get(k) and not k.startswith(SKIP_ENV)]
    sections.append(("environment", rows))

    sta, stb = a["run.json"].get("stages", {}), b["run.json"].get("stages", {})
    rows = []
    for k in list(sta) + [x for x in stb if x not in sta]:
        x, y = sta.get(k, {}), stb.get(k, {})
        if x.get("hash") != y.get("hash") or x.get("status") != y.get("status"):
            rows.append((k, f"{x.get('status', '-')} {str(x.get('hash', ''))[:10]}",
                         f"{y.get('status', '-')} {str(y.get('hash', ''))[:10]}",
                         "same inputs" if x.get("hash") == y.get("hash") else "inputs differ"))
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
