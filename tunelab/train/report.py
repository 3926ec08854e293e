"""What a training run shows and leaves behind: the data preview before training, the forgetting probe, the
before/after eval (through ``tunelab.evaluate.runner.EvalRunner``), and ``report.json`` + ``report.html``
(trainable parameters, peak RSS, tok/s, an MFU estimate, the loss curve, eval before/after with intervals).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.train.artifacts import write_json
from tunelab.train.data import (TrainData, dump_example, end_of_turn_marker, eos_supervised, load_train_data)
from tunelab.train.loop import FitResult
from tunelab.train.loss import mean_nll
from tunelab.train.modeling import count_parameters
from tunelab.train.schedule import make_plan
from tunelab.train.session import TrainSession
from tunelab.train.throughput import peak_rss_gb


# --------------------------------------------------------------------------------------------------
# before training: preview and token statistics
# --------------------------------------------------------------------------------------------------
def marked_text(tokens: list[tuple[str, bool]]) -> str:
    """The example's text with every run of target tokens in ⟦…⟧."""
    out, inside = [], False
    for text, target in tokens:
        if target and not inside:
            out.append("⟦")
        if not target and inside:
            out.append("⟧")
        inside = target
        out.append(text)
    if inside:
        out.append("⟧")
    return "".join(out)


def show_preview(run: TrainSession) -> dict[str, Any]:
    """Print the token statistics and the first example with its supervised tokens marked; check the EOS."""
    from tunelab.errors import DataError
    from tunelab.train.data import supervision_preview

    data, tok = run.data, run.tokenizer
    stats = data.stats.as_dict()
    first = data.examples[0]
    eot = end_of_turn_marker(tok) if data.format != "text" else None
    eos_ok = eos_supervised(first, tok, eot)
    info = {"format": data.format, "path": str(data.path), "sources": data.sources, "stats": stats,
            "first_example": first.where, "first_targets": first.n_targets, "eos_supervised": eos_ok}
    if not run.is_main:
        return info
    text = marked_text(supervision_preview(first, tok))
    plan = make_plan(run.cfg, len(data.examples))
    t = run.cfg.train
    accum = max(1, math.ceil(t.batch_size // run.world / t.micro_batch_size))
    lines = [
        f"data: {data.describe()}, {stats['examples']:,} examples, {stats['tokens']:,} tokens, "
        f"{stats['target_tokens']:,} targets ({stats['target_share']:.1%})",
        f"  length mean {stats['length_mean']}, p50 {stats['length_p50']}, p95 {stats['length_p95']}, "
        f"max {stats['length_max']}" + (f"; {stats['dropped_too_long']} dropped (> data.max_seq_len "
                                         f"{run.cfg.data.max_seq_len})" if stats["dropped_too_long"] else ""),
        f"plan: {plan.total_steps} steps of {t.batch_size} examples ({plan.steps_per_epoch} per epoch), "
        f"micro-batch {t.micro_batch_size}" + (f" (<= {t.micro_batch_tokens} tokens)" if t.micro_batch_tokens else "")
        + f" x {accum} accumulation x {run.world} process(es), "
        f"{'packed' if t.packing else 'padded'}, warmup {plan.warmup}, autocast {run.autocast or 'off'}, "
        f"device {run.device}",
        f"first example ({first.where}), {len(first)} tokens, {first.n_targets} supervised, marked ⟦…⟧:",
    ]
    if t.prompt_loss_weight:
        lines.insert(-1, f"prompt loss: the other {first.n_prompt_targets} tokens of each example are trained too, "
                         f"their mean loss weighted {t.prompt_loss_weight:g} x the answer's "
                         "(train.prompt_loss_weight)")
    if t.ema_decay:
        lines.insert(-1, f"weight average: ema_decay {t.ema_decay:g} (about the last {round(1 / (1 - t.ema_decay))} "
                         f"steps) is the result; the last weights go to {run.out.name}/"
                         f"{'adapter' if run.cfg.method == 'lora' else 'model'}-last")
    for ln in lines:
        run.log(ln)
    run.log(text)
    if data.format != "text":
        if not eos_ok:
            msg = (f"the end-of-turn token {eot!r} is not among the supervised tokens of the first example: "
                   "the model would not learn to stop")
            special = tok.convert_tokens_to_ids(eot) if eot else None
            if isinstance(special, int) and special != tok.unk_token_id:
                raise DataError(msg, where=first.where)
            run.log("warning: " + msg)
        else:
            run.log(f"end-of-turn {eot!r} is supervised: ok")
    return info


def dry_run_summary(run: TrainSession) -> dict[str, Any]:
    plan = make_plan(run.cfg, len(run.data.examples))
    out = {"dry_run": True, "method": run.cfg.method, "model": str(run.model_path), "data": run.data.stats.as_dict(),
           "format": run.data.format, "steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
           "warmup_steps": plan.warmup, "first_example": json.loads(dump_example(run.data.examples[0], run.tokenizer))}
    run.log("dry run: nothing was trained")
    return out


def parameter_summary(model: torch.nn.Module) -> dict[str, Any]:
    return count_parameters(model)


def write_inference_files(run: TrainSession, target: Path) -> None:
    """The exact chat template and PromptSpec used, so eval and serve render the same tokens as training."""
    tmpl = getattr(run.tokenizer, "chat_template", None)
    if isinstance(tmpl, str):
        (target / "chat_template.jinja").write_text(tmpl, encoding="utf-8")
    meta: dict[str, Any] = {"method": run.cfg.method, "base_model": run.cfg.model or "bundled",
                            "base_model_path": str(run.model_path), "data": str(run.data.path),
                            "format": run.data.format}
    if run.cfg.data.prompt:
        write_prompt_spec(run.cfg.data.prompt, run.data.spec, target / "prompt_spec.yaml")
        spec = run.data.spec
        if spec is not None and hasattr(spec, "content_hash"):
            meta["prompt_spec_hash"] = spec.content_hash()
        meta["prompt_spec_source"] = run.cfg.data.prompt
    meta["config"] = run.cfg.model_dump(mode="json")
    write_json(target / "tunelab_train.json", meta)


def write_prompt_spec(source: str, spec: Any, target: Path) -> None:
    """The spec as trained: the file itself, or (few-shot examples drawn from a file) a self-contained copy
    with the examples inline, so the adapter directory does not depend on paths next to the original."""
    examples = getattr(spec, "examples", None)
    if spec is None or isinstance(examples, list) or not hasattr(spec, "resolve_examples"):
        shutil.copyfile(source, target)
        return
    import yaml

    data = spec.model_dump(mode="json", exclude_none=True)
    data["examples"] = [e.model_dump(mode="json", exclude_none=True) for e in spec.resolve_examples()]
    target.write_text(f"# {Path(source).name} as trained (few-shot examples resolved inline)\n"
                      + yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# forgetting probe
# --------------------------------------------------------------------------------------------------
@dataclass
class ForgettingProbe:
    """Perplexity on general data the task does not train, before and after (the same model in memory)."""

    data: TrainData | None = None
    before: float | None = None
    after: float | None = None

    @classmethod
    def create(cls, run: TrainSession) -> "ForgettingProbe":
        f = run.cfg.forgetting
        if f is None:
            return cls()
        from tunelab.train.config import TrainDataConfig

        dc = TrainDataConfig(path=f.data, format=f.format, limit=f.limit, max_seq_len=run.cfg.data.max_seq_len)
        return cls(load_train_data(dc, run.tokenizer, method="lora"))

    def _nll(self, run: TrainSession, model) -> float:
        return mean_nll(model, self.data.examples, device=run.device, autocast=run.autocast,
                        pad_id=run.tokenizer.pad_token_id or 0)

    def measure_before(self, run: TrainSession, model) -> None:
        if self.data is None or not run.is_main:
            return
        cached = run.out / "forgetting_before.json"
        if run.resume and cached.is_file():  # measured before the run was interrupted
            self.before = json.loads(cached.read_text())["nll"]
            return
        self.before = self._nll(run, model)
        write_json(cached, {"nll": self.before})
        run.log(f"forgetting probe before: perplexity {math.exp(self.before):.3f} on {len(self.data.examples)} "
                f"examples of {self.data.path.name}")

    def measure_after(self, run: TrainSession, model) -> None:
        if self.data is None or not run.is_main:
            return
        self.after = self._nll(run, model)
        run.log(f"forgetting probe after: perplexity {math.exp(self.after):.3f} "
                f"(before {math.exp(self.before):.3f})")

    def as_dict(self) -> dict[str, Any] | None:
        if self.data is None or self.before is None:
            return None
        d = {"data": str(self.data.path), "examples": len(self.data.examples),
             "target_tokens": self.data.stats.target_tokens, "nll_before": round(self.before, 5),
             "perplexity_before": round(math.exp(self.before), 4)}
        if self.after is not None:
            d.update(nll_after=round(self.after, 5), perplexity_after=round(math.exp(self.after), 4),
                     perplexity_change_pct=round((math.exp(self.after - self.before) - 1) * 100, 2))
        return d


# --------------------------------------------------------------------------------------------------
# before/after eval (EvalRunner)
# --------------------------------------------------------------------------------------------------
def before_after_eval(run: TrainSession, artifact: Path, kind: str, last: Path | None = None
                      ) -> dict[str, Any] | None:
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
    out: dict[str, Any] = {"config": e.config or e.data, "items": summary.n_items,
                           "metric": summary.metric, "wall_s": round(time.perf_counter() - t0, 1),
                           "variants": {}}
    if last is not None:
        out["ema"] = {}
    for variant in sorted({r.variant for r in rows}):
        by = {m.name: {r.item_id: bool(r.correct) for r in rows
                       if r.variant == variant and r.model == m.name and r.sample == 0 and r.correct is not None}
              for m in models}
        out["variants"][variant] = paired_comparison(by["before"], by["after"], confidence=cfg.confidence,
                                                     seed=cfg.seed).model_dump(mode="json")
        if last is not None:
            out["ema"][variant] = paired_comparison(by["last"], by["after"], confidence=cfg.confidence,
                                                seed=cfg.seed).model_dump(mode="json")
    return out


# --------------------------------------------------------------------------------------------------
# throughput and MFU
# --------------------------------------------------------------------------------------------------
def measured_matmul_flops(device: torch.device, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in the training dtype on this machine now: the reference for MFU."""
    n = 1024
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def flops_per_token(model_config: Any, method: str, mean_row_len: float, target_share: float,
                    recompute: bool) -> float:
    """Approximate training FLOPs per token of a Llama-style decoder (forward = 2 x matmul params)."""
    d = model_config.hidden_size
    L = model_config.num_hidden_layers
    inter = model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads)
    hd = getattr(model_config, "head_dim", d // heads)
    linear = L * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter)
    fwd = 2 * linear + 4 * L * mean_row_len * heads * hd  # matmuls + attention scores and values
    head = 2 * d * model_config.vocab_size * target_share
    passes = 3 if method in ("full", "pretrain") else 2  # LoRA: no weight gradients for the frozen base
    total = passes * (fwd + head)
    if recompute:
        total += fwd
    return total


# --------------------------------------------------------------------------------------------------
# the end of a run
# --------------------------------------------------------------------------------------------------
def env_info() -> dict[str, Any]:
    """The software and machine of the run (report.json's ``environment``)."""
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def finish(run: TrainSession, result: FitResult, params: dict[str, Any], probe: ForgettingProbe, *,
           artifact: Path, kind: str, last: Path | None = None) -> dict[str, Any]:
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        return {}
    from transformers import AutoConfig

    stats = run.data.stats.as_dict()
    mcfg = AutoConfig.from_pretrained(str(run.model_path))
    t = run.cfg.train
    mean_len = min(max(stats["length_mean"], 1), t.pack_len) if not t.packing else \
        min(t.pack_len, stats["length_mean"] * t.micro_batch_size)
    share = 1.0 if t.prompt_loss_weight else stats["target_share"]
    fpt = flops_per_token(mcfg, run.cfg.method, mean_len, share, t.activation_checkpointing)
    peak = measured_matmul_flops(run.device, run.autocast)
    mfu = result.tok_s * fpt / peak if peak else None
    ev = None
    try:
        ev = before_after_eval(run, artifact, kind, last)
    except Exception as e:  # noqa: BLE001 - the trained artifact is saved; report the eval failure, do not lose it
        run.log(f"warning: before/after eval failed: {type(e).__name__}: {e}")
        ev = {"error": f"{type(e).__name__}: {e}"}
    losses = [h["loss"] for h in result.history]
    rep = {
        "name": run.cfg.name or run.out.name, "method": run.cfg.method, "base_model": run.cfg.model or "bundled",
        "artifact": str(artifact), "artifact_kind": kind, "out": str(run.out),
        "ema_decay": t.ema_decay, "last_weights": str(last) if last is not None else None,
        "parameters": params, "data": {"path": str(run.data.path), "format": run.data.format, **stats,
                                       "sources": run.data.sources},
        "steps": result.steps, "resumed_from": result.resumed_from, "processes": run.world,
        "tokens": result.tokens, "target_tokens": result.target_tokens,
        "train_seconds": round(result.train_seconds, 2), "tok_s": round(result.tok_s, 2),
        "peak_rss_gb": round(result.peak_rss_gb, 3), "peak_rss_gb_with_eval": round(peak_rss_gb(), 3),
        "autocast": str(run.autocast) if run.autocast else None,
        "device": str(run.device),
        "mfu": {"estimate": round(mfu, 4) if mfu is not None else None, "flops_per_token": round(fpt),
                "reference_flops": round(peak), "reference": f"measured {run.autocast or torch.float32} 1024^3 "
                                                              "matmul on this machine at the end of the run"},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None},
        "history": result.history, "forgetting": probe.as_dict(), "eval": ev,
        "config": run.cfg.model_dump(mode="json"), "environment": env_info(),
    }
    write_json(run.out / "report.json", rep)
    write_html(run.out / "report.html", rep)
    run.log(f"done: {result.steps} steps, loss {rep['loss']['first']:.4f} -> {rep['loss']['last']:.4f}, "
            f"{rep['tok_s']:.0f} tok/s, peak RSS {rep['peak_rss_gb']:.2f} GB; {kind}: {artifact}")
    if ev and "variants" in ev:
        for v, c in ev["variants"].items():
            if c.get("n"):
                run.log(f"eval {v}: {_paired_text(c, 'after', 'before')}")
        for v, c in ev.get("ema", {}).items():
            if c.get("n"):
                run.log(f"eval {v}, weight average (ema_decay {t.ema_decay:g}) vs last weights: "
                        f"{_paired_text(c, 'average', 'last weights')}")
    run.log(f"report: {run.out / 'report.html'}")
    return rep


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def loss_svg(history: list[dict[str, Any]]) -> str:
    if not history:
        return "<p>no steps</p>"
    from tunelab.report.plots import loss_curves

    return loss_curves({"loss": ([h["step"] for h in history], [h["loss"] for h in history])})


def _row(k: str, v: Any) -> str:
    return f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"


def _mfu_text(m: dict[str, Any]) -> str:
    if m["estimate"] is None:
        return "-"
    return f"{m['estimate']:.1%} of {m['reference_flops'] / 1e9:.0f} GFLOP/s ({m['reference']})"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _paired_text(c: dict[str, Any], b_name: str, a_name: str) -> str:
    """``a -> b: <the comparison's sentence>`` of a serialised PairedComparison."""
    from tunelab.stats import PairedComparison, paired_sentence

    pc = PairedComparison.model_validate(c)
    return f"{pc.a.value:.1%} -> {pc.b.value:.1%}: {paired_sentence(b_name, a_name, pc)}"


def _paired_table(variants: dict[str, dict[str, Any]], before: str, after: str) -> str:
    rows = [f"<table><tr><th>variant</th><th>{before}</th><th>{after}</th><th>difference</th><th>gained / lost</th>"
            "<th>p</th></tr>"]
    for v, c in variants.items():
        if not c.get("n"):
            continue
        a, b, d = c["a"], c["b"], c["diff"]
        rows.append(
            f"<tr><td>{html.escape(v)}</td><td>{_pct(a['value'])} [{_pct(a['low'])}, {_pct(a['high'])}]</td>"
            f"<td>{_pct(b['value'])} [{_pct(b['low'])}, {_pct(b['high'])}]</td><td>{d['value'] * 100:+.1f} "
            f"[{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]</td><td>{c['gained']} / {c['lost']}</td>"
            f"<td>{c['p_value']:.3g}</td></tr>")
    return "".join(rows) + "</table>"


def write_html(path: Path, rep: dict[str, Any]) -> None:
    p = rep["parameters"]
    d = rep["data"]
    parts = [f"<h1>tunelab train: {html.escape(rep['name'])}</h1>",
             "<h2>Run</h2><table>",
             _row("method", rep["method"]), _row("base model", rep["base_model"]),
             _row(rep["artifact_kind"], rep["artifact"]),
             _row("trainable parameters", f"{p['trainable']:,} of {p['total']:,} ({p['trainable_share']:.2%})"),
             _row("steps", f"{rep['steps']}" + (f" (resumed at {rep['resumed_from']})" if rep["resumed_from"] else "")),
             _row("processes", rep["processes"]), _row("device / autocast", f"{rep['device']} / {rep['autocast']}"),
             _row("tokens (targets)", f"{rep['tokens']:,} ({rep['target_tokens']:,})"),
             _row("train time", f"{rep['train_seconds']:.1f} s"), _row("throughput", f"{rep['tok_s']:.1f} tok/s"),
             _row("peak RSS (training / with eval)",
                  f"{rep['peak_rss_gb']:.2f} / {rep['peak_rss_gb_with_eval']:.2f} GB"),
             _row("MFU (estimate)", _mfu_text(rep["mfu"])),
             _row("loss first / last", f"{rep['loss']['first']:.4f} / {rep['loss']['last']:.4f}"),
             "</table>",
             "<h2>Data</h2><table>",
             _row("file", f"{d['path']} ({d['format']})"),
             *[_row("mixed in", f"{x['path']} ({x['format']}, {x['examples']:,} examples)")
               for x in d.get("sources", [])[1:]],
             _row("examples / tokens / targets", f"{d['examples']:,} / {d['tokens']:,} / {d['target_tokens']:,} "
                                                 f"({d['target_share']:.1%})"),
             _row("length mean / p50 / p95 / max", f"{d['length_mean']} / {d['length_p50']} / {d['length_p95']} / "
                                                   f"{d['length_max']}"),
             "</table>", "<h2>Loss</h2>", loss_svg(rep["history"])]
    ev = rep.get("eval")
    if ev:
        parts.append("<h2>Eval before / after</h2>")
        if "error" in ev:
            parts.append(f"<p>failed: {html.escape(ev['error'])}</p>")
        else:
            parts.append(f"<p>{html.escape(str(ev['config']))}, {ev['items']} items; 95% intervals (Wilson for "
                         "accuracies, paired bootstrap for the difference), exact McNemar test.</p>")
            parts.append(_paired_table(ev["variants"], "before", "after"))
            if ev.get("ema"):
                parts.append(f"<h3>Weight average (ema_decay {rep['ema_decay']:g}) against the last weights</h3>"
                             f"<p>{html.escape(rep['artifact'])} holds the average; the last weights are in "
                             f"{html.escape(str(rep['last_weights']))}.</p>")
                parts.append(_paired_table(ev["ema"], "last weights", "average"))
    fg = rep.get("forgetting")
    if fg:
        parts += ["<h2>Forgetting probe</h2><table>", _row("data", f"{fg['data']} ({fg['examples']} examples)"),
                  _row("perplexity before", fg["perplexity_before"])]
        if "perplexity_after" in fg:
            parts += [_row("perplexity after", fg["perplexity_after"]),
                      _row("change", f"{fg['perplexity_change_pct']:+.2f}%")]
        parts.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}th{background:#f4f4f4}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab train: {html.escape(rep['name'])}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(doc, encoding="utf-8")
