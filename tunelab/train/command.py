"""`tunelab train`, `tunelab merge` and `tunelab export` (registered by tunelab/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from tunelab.options import choices, field_default, field_option, given_fields
from tunelab.train.config import TrainConfig


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


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Argument(None, help="Train config YAML (flags override its fields)."),
    method: str = field_option(TrainConfig, "method", "--method", help=choices(TrainConfig, "method")),
    data: Optional[Path] = field_option(TrainConfig, "data.path", "--data", "-d",
                                        help="Training data (JSONL, .txt, or a folder)."),
    prompt: Optional[Path] = field_option(TrainConfig, "data.prompt", "--prompt", "-p",
                                          help="PromptSpec YAML for labelled items."),
    data_format: str = field_option(TrainConfig, "data.format", "--format", help=choices(TrainConfig, "data.format")),
    model: Optional[str] = field_option(TrainConfig, "model", "--model", "-m", help="bundled | HF dir | .gguf"),
    out: Path = field_option(TrainConfig, "out", "--out", "-o", help="Output directory."),
    limit: Optional[int] = field_option(TrainConfig, "data.limit", "--limit", "-n",
                                        help="Use only the first N records."),
    encoding: Optional[str] = field_option(TrainConfig, "data.encoding", "--encoding",
                                           help="The data file's encoding when it is not UTF-8 (e.g. cp949)."),
    epochs: float = field_option(TrainConfig, "train.epochs", "--epochs", help="Epochs (may be fractional)."),
    max_steps: Optional[int] = field_option(TrainConfig, "train.max_steps", "--max-steps",
                                            help="Stop after N optimizer steps."),
    lr: float = field_option(TrainConfig, "optim.lr", "--lr", help="Peak learning rate."),
    batch_size: int = field_option(TrainConfig, "train.batch_size", "--batch-size",
                                   help="Examples per optimizer step."),
    micro_batch_size: str = field_option(TrainConfig, "train.micro_batch_size", "--micro-batch-size",
                                         help="Examples per forward, or auto: as many as fit in "
                                              "train.micro_batch_tokens."),
    max_seq_len: int = field_option(TrainConfig, "data.max_seq_len", "--max-seq-len"),
    packing: bool = field_option(TrainConfig, "train.packing", "--packing/--no-packing",
                                 help="Padding-free packed rows."),
    lora_r: int = field_option(TrainConfig, "lora.r", "--lora-r"),
    lora_alpha: float = field_option(TrainConfig, "lora.alpha", "--lora-alpha"),
    target_modules: str = field_option(TrainConfig, "lora.target_modules", "--target-modules",
                                       help="all-linear or comma-separated names (q_proj,v_proj)"),
    quantize: str = field_option(
        TrainConfig, "lora.quantize", "--quantize",
        help=choices(TrainConfig, "lora.quantize") + ": LoRA on a base loaded in 4-bit NF4 (QLoRA) or 8-bit."),
    init_adapter: Optional[Path] = field_option(
        TrainConfig, "lora.init_adapter", "--init-adapter",
        help="LoRA: start from this adapter (continue it, or carry it to a related task)."),
    seed: int = field_option(TrainConfig, "train.seed", "--seed"),
    dtype: str = field_option(TrainConfig, "train.dtype", "--dtype",
                              help=choices(TrainConfig, "train.dtype") + " (autocast)"),
    activation_checkpointing: bool = field_option(
        TrainConfig, "train.activation_checkpointing", "--activation-checkpointing/--no-activation-checkpointing",
        help="Recompute activations in backward."),
    prompt_loss_weight: float = field_option(
        TrainConfig, "train.prompt_loss_weight", "--prompt-loss-weight",
        help="SFT: also train the prompt tokens, their mean loss weighted W x the answer's (0: answers only)."),
    ema_decay: Optional[float] = field_option(
        TrainConfig, "train.ema_decay", "--ema-decay",
        help="Save a moving average of the weights (e.g. 0.998) as the result, the last weights beside it."),
    checkpoint_every: Optional[int] = field_option(TrainConfig, "checkpoint.every_steps", "--checkpoint-every",
                                                   help="Save a resumable checkpoint every N steps."),
    eval_data: Optional[Path] = field_option(TrainConfig, "eval.data", "--eval-data",
                                             help="Held-out labelled items: accuracy before/after training."),
    eval_config: Optional[Path] = field_option(TrainConfig, "eval.config", "--eval-config",
                                               help="An eval YAML run before/after."),
    eval_limit: Optional[int] = field_option(TrainConfig, "eval.limit", "--eval-limit"),
    forgetting: Optional[Path] = field_option(TrainConfig, "forgetting.data", "--forgetting",
                                              help="General data for the forgetting probe (perplexity before/after)."),
    device: str = field_option(TrainConfig, "train.device", "--device", help=choices(TrainConfig, "train.device")),
    threads: Optional[int] = field_option(TrainConfig, "train.threads", "--threads", help="torch CPU threads."),
    set_: List[str] = typer.Option([], "--set", help="Any field: --set optim.warmup_ratio=0.1 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out (the same "
                                                        "config only)."),
    force: bool = typer.Option(False, "--force", help="Replace the run in --out (its adapter, model, checkpoints, "
                                                      "metrics and report; other files stay)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print token statistics and the first "
                                                          "example's supervised tokens; train nothing."),
) -> None:
    """Fine-tune (LoRA or full) or continue pre-training.

    Quick form: tunelab train --method lora --prompt SPEC.yaml --data FILE.jsonl --out DIR
    """
    import os

    from tunelab.console import err_console
    from tunelab.errors import ConfigError
    from tunelab.train.config import load_train_config
    from tunelab.train.recipes import recipe

    if config is None and data is None:
        raise ConfigError("give a train config YAML, or --data FILE (with --prompt SPEC.yaml for labelled items); "
                          "see `tunelab train --help`", where="<command line>")
    overrides = given_fields(ctx, train_cmd)
    if "lora.target_modules" in overrides and target_modules != "all-linear":
        overrides["lora.target_modules"] = [s.strip() for s in target_modules.split(",")]
    if "train.batch_size" in overrides and "train.micro_batch_size" not in overrides and config is None:
        overrides["train.micro_batch_size"] = min(batch_size, field_default(TrainConfig, "train.micro_batch_size"))
    cfg = load_train_config(config, overrides, parse_set(set_))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = recipe(cfg.method).run(cfg, resume=resume, dry_run=dry_run, force=force, log=stderr_log,
                                    console=err_console)
    if dry_run and result is not None:
        print(result.model_dump_json(indent=1))


def merge_cmd(
    adapter: Path = typer.Argument(..., help="Adapter directory (or a train --out directory holding adapter/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged HF model."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the one trained on)."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="JSONL of probe prompts for the greedy check."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Tokens compared per probe."),
    allow_other_base: bool = typer.Option(False, "--allow-other-base",
                                          help="Merge an adapter into a base other than the one it was trained on "
                                               "(same shapes; refused otherwise)."),
) -> None:
    """Merge a LoRA adapter into its base model (safetensors) and check greedy outputs match the adapter."""
    from tunelab.train.merge import merge_adapter

    res = merge_adapter(adapter, out, model=model, probe_file=probe, max_new_tokens=max_new_tokens,
                        allow_other_base=allow_other_base, log=stderr_log)
    print(str(res.out))


def export_cmd(
    source: str = typer.Argument(..., help="A model (bundled | HF dir | .gguf), a train --out directory, or an "
                                           "adapter directory (merged on the way, as `tunelab merge` does)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write (--format gguf; an Ollama Modelfile "
                                                      "goes beside it), or a new directory (--format hf)."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama) | hf (safetensors directory)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="GGUF weights: f16 (default) | q8_0"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="An adapter's base (default: the one trained "
                                                                    "on)."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="JSONL of probe prompts for the checks."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Greedy tokens compared per probe."),
    allow_other_base: bool = typer.Option(False, "--allow-other-base",
                                          help="Merge an adapter into a same-shaped base other than its own."),
) -> None:
    """Export a model or a run's adapter as GGUF (+ Ollama Modelfile) or a merged HF directory, read back and checked.

    tunelab export runs/train/x --format gguf --dtype q8_0 --out exports/x.gguf
    """
    from tunelab.console import new_progress, progress_factory
    from tunelab.train.export import export_model

    with new_progress(transient=True) as progress:
        res = export_model(source, out, fmt=fmt, dtype=dtype, model=model, probe_file=probe,
                           max_new_tokens=max_new_tokens, allow_other_base=allow_other_base, log=stderr_log,
                           progress=progress_factory(progress))
    print(str(res.out))
    if res.modelfile is not None:
        print(str(res.modelfile))


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("merge")(merge_cmd)
    app.command("export")(export_cmd)
