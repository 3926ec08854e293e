"""Before training: the data preview. ``show_preview`` prints the token statistics, the step plan and the first
example with its supervised tokens marked ⟦…⟧ (``marked_text``), and checks that the end of turn is supervised;
``dry_run_summary`` is what ``--dry-run`` prints.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tunelab.train.data import dump_example, end_of_turn_marker, eos_supervised
from tunelab.train.schedule import make_plan
from tunelab.train.results import TrainDryRun
from tunelab.train.session import TrainSession


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
    if t.micro_batch_size == "auto":
        micro = f"micro-batches filled to {t.micro_batch_tokens} tokens"
    else:
        accum = max(1, math.ceil(t.batch_size // run.world / t.micro_batch_size))
        micro = (f"micro-batch {t.micro_batch_size}" + (f" (<= {t.micro_batch_tokens} tokens)" if t.micro_batch_tokens
                                                        else "") + f" x {accum} accumulation")
    attention = run.attention if t.packing else "the model's own (padded rows)"
    lines = [
        f"data: {data.describe()}, {stats['examples']:,} examples, {stats['tokens']:,} tokens, "
        f"{stats['target_tokens']:,} targets ({stats['target_share']:.1%})",
        f"  length mean {stats['length_mean']}, p50 {stats['length_p50']}, p95 {stats['length_p95']}, "
        f"max {stats['length_max']}" + (f"; {stats['dropped_too_long']} dropped (> data.max_seq_len "
                                         f"{run.cfg.data.max_seq_len})" if stats["dropped_too_long"] else ""),
        f"plan: {plan.total_steps} steps of {t.batch_size} examples ({plan.steps_per_epoch} per epoch), {micro} "
        f"x {run.world} process(es), {'packed' if t.packing else 'padded'}, warmup {plan.warmup}, "
        f"autocast {run.autocast or 'off'}, device {run.device}",
        f"attention {attention} (train.attention {t.attention}), compile "
        f"{'on: each decoder layer' if run.compile else 'off'} (train.compile {str(t.compile).lower()})"
        + (f", rows padded to a multiple of {run.pad_to} tokens" if run.pad_to else ""),
        f"first example ({first.where}), {len(first)} tokens, {first.n_targets} supervised, marked ⟦…⟧:",
    ]
    if run.memory is not None:
        from tunelab.train.memory import describe

        budget = f", budget {t.max_memory_gb:g} GB" if t.max_memory_gb else ""
        lines.insert(-1, f"memory ({run.memory.device}, estimated): {describe(run.memory)}{budget}")
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


def dry_run_summary(run: TrainSession) -> TrainDryRun:
    plan = make_plan(run.cfg, len(run.data.examples))
    out = TrainDryRun(method=run.cfg.method, model=str(run.model_path), data=run.data.stats.as_dict(),
                      format=run.data.format, steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                      warmup_steps=plan.warmup, memory=run.memory, attention=run.attention,
                      compile=run.compile,
                      first_example=json.loads(dump_example(run.data.examples[0], run.tokenizer)))
    run.log("dry run: nothing was trained")
    return out
