"""`tunelab train` and `tunelab merge` (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

RECIPES = {"lora": "tunelab.train.lora", "full": "tunelab.train.full", "pretrain": "tunelab.train.pretrain"}


def parse_set(items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as ``{"FIELD": value}``; each value is parsed as YAML (null, 1e-4, [a, b])."""
    import yaml

    from tunelab.errors import ConfigError

    out = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--set {it!r}: expected FIELD=VALUE, e.g. --set optim.lr=1e-4", where="<command line>")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Train config YAML (flags override its fields)."),
    method: Optional[str] = typer.Option(None, "--method", help="lora | full | pretrain"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Training data (JSONL, .txt, or a folder)."),
    prompt: Optional[Path] = typer.Option(None, "--prompt", "-p", help="PromptSpec YAML for labelled items."),
    data_format: Optional[str] = typer.Option(None, "--format", help="auto | chat | alpaca | sharegpt | text | prompt"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="bundled | HF dir | .gguf"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Use only the first N records."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs (may be fractional)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after N optimizer steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per optimizer step."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", min=1, help="Examples per forward."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", min=8),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Padding-free packed rows."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", min=1),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha"),
    target_modules: Optional[str] = typer.Option(None, "--target-modules",
                                                 help="all-linear or comma-separated names (q_proj,v_proj)"),
    init_adapter: Optional[Path] = typer.Option(
        None, "--init-adapter", help="LoRA: start from this adapter (continue it, or carry it to a related task)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | bfloat16 | float32 (autocast)"),
    activation_checkpointing: Optional[bool] = typer.Option(
        None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute activations in backward."),
    prompt_loss_weight: Optional[float] = typer.Option(
        None, "--prompt-loss-weight", min=0.0,
        help="SFT: also train the prompt tokens, their mean loss weighted W x the answer's (0: answers only)."),
    ema_decay: Optional[float] = typer.Option(
        None, "--ema-decay",
        help="Save a moving average of the weights (e.g. 0.998) as the result, the last weights beside it."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1,
                                                   help="Save a resumable checkpoint every N steps."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data",
                                             help="Held-out labelled items: accuracy before/after training."),
    eval_config: Optional[Path] = typer.Option(None, "--eval-config", help="An eval YAML run before/after."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1),
    forgetting: Optional[Path] = typer.Option(None, "--forgetting",
                                              help="General data for the forgetting probe (perplexity before/after)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    set_: List[str] = typer.Option([], "--set", help="Any field: --set optim.warmup_ratio=0.1 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print token statistics and the first "
                                                          "example's supervised tokens; train nothing."),
) -> None:
    """Fine-tune (LoRA or full) or continue pre-training.

    Quick form: tunelab train --method lora --prompt SPEC.yaml --data FILE.jsonl --out DIR
    """
    import importlib
    import os

    from tunelab.console import err_console
    from tunelab.errors import ConfigError
    from tunelab.train.config import load_train_config
    from tunelab.train.loop import stderr_log

    if config is None and data is None:
        raise ConfigError("give a train config YAML, or --data FILE (with --prompt SPEC.yaml for labelled items); "
                          "see `tunelab train --help`", where="<command line>")
    overrides = {
        "method": method, "model": model, "out": str(out) if out else None,
        "data.path": str(data) if data else None, "data.prompt": str(prompt) if prompt else None,
        "data.format": data_format, "data.limit": limit, "data.max_seq_len": max_seq_len,
        "train.epochs": epochs, "train.max_steps": max_steps, "optim.lr": lr, "train.batch_size": batch_size,
        "train.micro_batch_size": micro_batch_size, "train.packing": packing, "train.seed": seed,
        "train.dtype": dtype, "train.activation_checkpointing": activation_checkpointing,
        "train.device": device, "train.threads": threads,
        "train.prompt_loss_weight": prompt_loss_weight, "train.ema_decay": ema_decay,
        "lora.r": lora_r, "lora.alpha": lora_alpha,
        "lora.target_modules": ([s.strip() for s in target_modules.split(",")] if target_modules and
                                target_modules != "all-linear" else target_modules),
        "lora.init_adapter": str(init_adapter) if init_adapter else None,
        "checkpoint.every_steps": checkpoint_every,
        "eval.data": str(eval_data) if eval_data else None, "eval.config": str(eval_config) if eval_config else None,
        "eval.limit": eval_limit, "forgetting.data": str(forgetting) if forgetting else None,
    }
    if batch_size is not None and micro_batch_size is None and config is None:
        overrides["train.micro_batch_size"] = min(batch_size, 8)
    cfg = load_train_config(config, overrides, parse_set(set_))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = importlib.import_module(RECIPES[cfg.method])
    result = recipe.run(cfg, resume=resume, dry_run=dry_run, log=stderr_log, console=err_console)
    if dry_run and result:
        import json

        print(json.dumps(result, ensure_ascii=False, indent=1, default=str))


def merge_cmd(
    adapter: Path = typer.Argument(..., help="Adapter directory (or a train --out directory holding adapter/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged HF model."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the one trained on)."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="JSONL of probe prompts for the greedy check."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Tokens compared per probe."),
) -> None:
    """Merge a LoRA adapter into its base model (safetensors) and check greedy outputs match the adapter."""
    from tunelab.train.loop import stderr_log
    from tunelab.train.merge import merge_adapter

    res = merge_adapter(adapter, out, model=model, probe_file=probe, max_new_tokens=max_new_tokens, log=stderr_log)
    print(str(res.out))


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("merge")(merge_cmd)
