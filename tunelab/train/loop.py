"""The training loop shared by every recipe: ``fit`` trains a model's trainable parameters on a session's data,
writes metrics.jsonl and checkpoints, resumes from the latest one (``_resume``) and returns a ``FitResult``.

One optimizer step takes ``batch_size`` examples (over all processes) in a fixed, seeded order, split into
micro-batches of ``micro_batch_size`` (or filled up to ``micro_batch_tokens``); gradients accumulate over them.
With ``train.compile`` the decoder layers are compiled for the steps (``tunelab.train.compile``) and put back after. The loss is the mean over the step's
target tokens, whatever the packing, micro-batching or number of processes (each micro-batch's summed loss
is divided by the step's total target count), so a packed and a padded run give the same losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.errors import ConfigError, TunelabError
from tunelab.train.checkpoint import (gathered_optimizer_state, latest_checkpoint, load_checkpoint,
                                      optimizer_from_files, rng_from_files, save_checkpoint)
from tunelab.train.collate import collate
from tunelab.train.compile import allow_recompiles, compile_layers
from tunelab.train.ema import WeightEMA, load_weights
from tunelab.train.loss import SupervisedLoss, batch_nll
from tunelab.train.modeling import trainable_named
from tunelab.train.optim import build_optimizer
from tunelab.train.progress import ProgressView
from tunelab.train.rundir import config_hash, write_run_config
from tunelab.train.schedule import Plan, lr_factor, make_plan, micro_batches
from tunelab.train.session import TrainSession
from tunelab.train.sharding import gathered, shard_like, sharded_share
from tunelab.train.throughput import peak_rss_gb

# Seconds to pause after each step (not counted in tok/s): lets the tests kill a run at a known point.
STEP_SLEEP = float(os.environ.get("TUNELAB_TRAIN_STEP_SLEEP", "0") or 0)


@dataclass
class FitResult:
    steps: int
    history: list[dict[str, Any]]
    tokens: int
    target_tokens: int
    train_seconds: float
    resumed_from: int | None
    peak_rss_gb: float = 0.0  # at the end of training (before saving, probes and eval)
    # with train.ema_decay: the model holds the averaged weights after fit; these are the last ones (on the CPU)
    last_weights: dict[str, torch.Tensor] | None = None
    # the prepared (DDP- or FSDP-wrapped) loss module: under FSDP every forward after training goes through it
    loss_module: torch.nn.Module | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def fit(run: TrainSession, model: torch.nn.Module, *, resume: bool | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        on_prepared: Callable[[torch.nn.Module], None] | None = None) -> FitResult:
    """Train ``model``'s trainable parameters on ``run.data``; checkpoints and resumes. Returns the history.
    ``on_prepared(loss_module)`` runs once the model is prepared (sharded under FSDP), before the first step."""
    cfg, acc = run.cfg, run.accelerator
    t, o = cfg.train, cfg.optim
    named = trainable_named(model)
    if not named:
        raise TunelabError("the model has no trainable parameters")
    plan = make_plan(cfg, len(run.data.examples))
    optimizer = build_optimizer(run, named)
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    # Under FSDP the average is made of the shards once the model is sharded (below)
    ema = WeightEMA(named, t.ema_decay) if t.ema_decay and not run.fsdp else None
    state = _resume(run, plan, named, optimizer, metrics_path, ema) if (run.resume if resume is None else resume) \
        else {}
    if state and hasattr(optimizer, "sync_from_device"):  # optim.offload: its CPU copies of the resumed weights
        optimizer.sync_from_device()
    start_step, tokens = state.get("step", 0), state.get("tokens", 0)
    targets_seen, elapsed = state.get("targets", 0), state.get("elapsed", 0.0)
    history: list[dict[str, Any]] = state.get("history", [])
    resumed_from = state.get("step")
    if run.is_main:
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
        if run.resolved is not None:  # what a later --resume must match (rundir.check_out_dir)
            write_run_config(out, run.resolved)

    pw = t.prompt_loss_weight  # 0 for pretrain (the config refuses it there)
    loss_module = SupervisedLoss(model)
    # optim.offload: its state stays in CPU memory (accelerate would round-trip it through the device)
    offloaded = hasattr(optimizer, "sync_from_device")
    loss_module, optimizer = acc.prepare(loss_module, optimizer, device_placement=[True, not offloaded])
    if run.fsdp:
        # fully_shard put DTensor parameters in place of the model's own: clip, average and checkpoint those
        named = trainable_named(model)
        ema = WeightEMA(named, t.ema_decay) if t.ema_decay else None
        run.log(f"FSDP2: {len(named)} trainable tensors sharded over {run.world} processes "
                f"({sharded_share(model):.0%} of this process's parameter elements held locally)")
        if state.get("checkpoint") is not None:
            _resume_sharded(run, state["checkpoint"], named, optimizer, ema)
    loss_module.train()
    if on_prepared is not None:
        on_prepared(loss_module)
        loss_module.train()
    view = ProgressView(plan.total_steps, start_step, run.console, run.is_main, run.log, t.log_every)
    uncompile = compile_layers(model, _longest_row(run)) if run.compile else None
    if run.pad_to and not run.compile:  # flex compiled on its own: one kernel per row bucket
        allow_recompiles(_longest_row(run))
    try:
        for step in range(start_step, plan.total_steps):
            t0 = time.perf_counter()
            lr = o.lr * lr_factor(step, plan.total_steps, plan.warmup, o.schedule, o.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            idx = plan.step_examples(step)
            step_targets = sum(run.data.examples[i].n_targets for i in idx)       # over all processes
            step_prompt = sum(run.data.examples[i].n_prompt_targets for i in idx) if pw else 0
            loss_sum, prompt_sum, step_tokens = _accumulate(run, loss_module, idx, step_targets, step_prompt)
            grad_norm = None
            if o.clip_grad_norm is not None:
                grad_norm = float(acc.clip_grad_norm_(list(named.values()), o.clip_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            stats = torch.tensor([float(loss_sum), float(step_tokens), float(prompt_sum)], device=run.device)
            if run.world > 1:
                stats = acc.reduce(stats, reduction="sum")
            loss = float(stats[0]) / max(1, step_targets)
            if not math.isfinite(loss):
                raise TunelabError(f"the loss is {loss} at step {step + 1}; lower optim.lr or check the data")
            tokens += int(stats[1])
            targets_seen += step_targets
            elapsed += time.perf_counter() - t0
            row = {"step": step + 1, "epoch": round((step + 1) / max(1, plan.steps_per_epoch), 4),
                   "loss": round(loss, 6), "lr": lr,
                   "grad_norm": None if grad_norm is None else round(grad_norm, 5), "tokens": tokens,
                   "targets": targets_seen, "tok_s": round(tokens / elapsed, 2) if elapsed else 0.0,
                   "elapsed_s": round(elapsed, 3)}
            if pw:
                row["prompt_loss"] = round(float(stats[2]) / max(1, step_prompt), 6)
            history.append(row)
            if run.is_main:
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            view.update(row)
            if STEP_SLEEP:
                time.sleep(STEP_SLEEP)
            every = cfg.checkpoint.every_steps
            if every and (step + 1) % every == 0 and step + 1 < plan.total_steps:
                _save_checkpoint(run, plan, step + 1, named, optimizer, ema, lr,
                                 {"tokens": tokens, "target_tokens": targets_seen, "train_seconds": elapsed})
                if on_checkpoint:
                    on_checkpoint(step + 1)
    finally:
        view.close()
        if uncompile is not None:  # the probes and evals after training run the plain layers
            uncompile()
    acc.wait_for_everyone()
    last = ema.swap_in() if ema is not None else None
    return FitResult(plan.total_steps, history, tokens, targets_seen, elapsed, resumed_from, peak_rss_gb(), last,
                     loss_module)


def _accumulate(run: TrainSession, loss_module: torch.nn.Module, idx: list[int], step_targets: int,
                step_prompt: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of the step that trains examples ``idx``; the
    gradients accumulate (DDP syncs them on the last micro-batch). Returns this process's summed answer NLL,
    summed prompt NLL and number of tokens."""
    t, acc = run.cfg.train, run.accelerator
    pw = t.prompt_loss_weight
    pad_id = run.tokenizer.pad_token_id or 0
    micros = micro_batches(run.data.examples, idx, run.rank, run.world, t.micro_batch_size, t.micro_batch_tokens)
    loss_sum = torch.zeros((), device=run.device)
    prompt_sum = torch.zeros((), device=run.device)
    step_tokens = 0
    for k, mb in enumerate(micros):
        batch = collate(mb, packing=t.packing, pack_len=t.pack_len, pad_id=pad_id,
                        varlen=run.varlen, prompt_targets=pw > 0, pad_to=run.pad_to).to(run.device)
        sync = k == len(micros) - 1
        with (contextlib.nullcontext() if sync else acc.no_sync(loss_module)):
            with run.autocast_ctx():
                nll = batch_nll(loss_module, batch)
            s, p = nll[:batch.n_targets].sum(), nll[batch.n_targets:].sum()
            # DDP averages gradients over processes: scale so the result is the step's token mean
            # (the answer's; plus prompt_loss_weight x the prompt's).
            objective = s * (run.world / max(1, step_targets))
            if step_prompt:
                objective = objective + p * (pw * run.world / step_prompt)
            acc.backward(objective)
        loss_sum += s.detach()
        prompt_sum += p.detach()
        step_tokens += batch.n_tokens
    return loss_sum, prompt_sum, step_tokens


def _longest_row(run: TrainSession) -> int:
    """An upper bound of the tokens in one row of a micro-batch (how many row buckets compiled layers can meet)."""
    from tunelab.train.memory import micro_batch_tokens

    t = run.cfg.train
    longest = max(len(e) for e in run.data.examples)
    if not t.packing:
        return longest
    return micro_batch_tokens(run.cfg, longest) if run.varlen else max(t.pack_len, longest)


def _save_checkpoint(run: TrainSession, plan: Plan, step: int, named: dict[str, torch.nn.Parameter], optimizer,
                     ema: WeightEMA | None, lr: float, counters: dict[str, Any]) -> None:
    """A resumable checkpoint after ``step`` steps: the trainable weights (and their average), the optimizer and
    RNG states, and the counters (``tokens``, ``target_tokens``, ``train_seconds``) that ``_resume`` reads."""
    weights = {n: p.detach() for n, p in named.items()}
    if ema is not None:
        weights.update(ema.tensors())
    if run.fsdp:  # full tensors, gathered to the main process (every process takes part, one tensor at a time)
        weights = gathered(weights, main=run.is_main)
        optimizer = gathered_optimizer_state(optimizer, main=run.is_main)
    save_checkpoint(run.out, step, weights=weights, optimizer=optimizer,
                    state={**counters, "ema_updates": ema.updates if ema is not None else None,
                           "epoch": step // max(1, plan.steps_per_epoch),
                           "step_in_epoch": step % max(1, plan.steps_per_epoch),
                           "total_steps": plan.total_steps, "lr": lr, "plan": plan.key(),
                           "config_hash": config_hash(run.resolved) if run.resolved is not None else None},
                    keep=run.cfg.checkpoint.keep, rank=run.rank, world=run.world,
                    barrier=run.accelerator.wait_for_everyone)


def _resume(run: TrainSession, plan: Plan, named: dict[str, torch.nn.Parameter], optimizer, metrics_path: Path,
            ema: WeightEMA | None = None) -> dict:
    """Load the latest checkpoint into the parameters, optimizer and RNGs; the counters to continue from."""
    ck = latest_checkpoint(run.out)
    if ck is None:
        run.log(f"--resume: no checkpoint in {run.out / 'checkpoints'}; starting from step 0")
        return {}
    loaded = load_checkpoint(ck, rank=run.rank)
    st = loaded["state"]
    if st.get("plan", plan.key()) != plan.key():
        raise ConfigError(f"the checkpoint was written for a different plan {st.get('plan')} than this run's "
                          f"{plan.key()}: resume with the same data, batch size, steps and seed", where=str(ck))
    if st.get("world_size", 1) != run.world:
        raise ConfigError(f"the checkpoint was written by {st.get('world_size')} processes, this run has "
                          f"{run.world}; resume with the same number", where=str(ck))
    missing = set(named) - set(loaded["weights"])
    if missing:
        raise ConfigError(f"the checkpoint does not match this model ({len(missing)} trainable tensors missing, "
                          f"e.g. {sorted(missing)[0]})", where=str(ck))
    load_weights(named, loaded["weights"])  # under FSDP: before sharding, which hands rank 0's weights on
    if not run.fsdp:  # under FSDP the optimizer state and the average are loaded into the shards (_resume_sharded)
        _load_optimizer_and_average(run, ck, loaded, optimizer, ema)
    if loaded["rng"] is not None:
        rng_from_files(*loaded["rng"])
    history = []
    if metrics_path.is_file():
        history = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        history = [h for h in history if h["step"] <= st["step"]]
    run.log(f"resumed from {ck.name}: step {st['step']}/{plan.total_steps}")
    return {"step": st["step"], "tokens": st["tokens"], "targets": st["target_tokens"],
            "elapsed": st["train_seconds"], "history": history,
            "checkpoint": (ck, loaded) if run.fsdp else None}


def _load_optimizer_and_average(run: TrainSession, ck: Path, loaded: dict, optimizer, ema: WeightEMA | None) -> None:
    """The checkpoint's optimizer state and weight average into this run's optimizer and ``ema``."""
    st = loaded["state"]
    if ema is not None and not ema.load(loaded["weights"], st.get("ema_updates", 0)):
        run.log(f"train.ema_decay: {ck.name} has no weight average; averaging from its weights on")
    # The config's per-group hyper-parameters win over the checkpoint's, as optim.lr does (the schedule is
    # recomputed every step); the split of the parameters into groups must be the one the checkpoint has.
    config_groups = [{k: g[k] for k in ("lr_scale", "weight_decay")} for g in optimizer.param_groups]
    try:
        optimizer_from_files(optimizer, *loaded["optimizer"])
    except ValueError as e:
        raise ConfigError(f"the checkpoint's optimizer does not fit this run's parameter groups ({e}): resume "
                          "with the same optim.param_groups matches", where=str(ck)) from None
    for g, want in zip(optimizer.param_groups, config_groups):
        g.update(want)


def _resume_sharded(run: TrainSession, checkpoint: tuple[Path, dict], named: dict[str, torch.nn.Parameter],
                    optimizer, ema: WeightEMA | None) -> None:
    """FSDP: the checkpoint's full optimizer tensors cut into this process's shards of the parameters they belong
    to (every process read the same files), then loaded as in a plain run; the average likewise (ema.load)."""
    ck, loaded = checkpoint
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors, meta = loaded["optimizer"]
    sharded = {}
    for key, v in tensors.items():
        pid = int(key.split(".", 1)[0])
        p = params[pid] if pid < len(params) else None
        sharded[key] = shard_like(v, p) if p is not None and tuple(v.shape) == tuple(p.shape) else v
    _load_optimizer_and_average(run, ck, {**loaded, "optimizer": (sharded, meta)}, optimizer, ema)
