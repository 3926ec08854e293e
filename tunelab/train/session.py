"""The runtime state of one training run (``TrainSession``): its config, output folder, processes (accelerate),
device and autocast dtype, tokenizer and data; ``start_session`` builds it, everything before the model is loaded
(also for the dry run). Named so as not to be confused with the experiments of `tunelab run`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunelab.errors import ConfigError
from tunelab.train.rundir import check_out_dir, clear_run
from tunelab.train.config import TrainConfig
from tunelab.train.data import TrainData
from tunelab.train.memory import preflight
from tunelab.train.precision import autocast_ctx, pick_autocast
from tunelab.train.sharding import check_fsdp, enable_fsdp
from tunelab.train.tokenizer import load_tokenizer


@dataclass
class TrainSession:
    """One training run as it runs: what ``fit``, the recipes and the report read (``log`` prints on the main
    process only)."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    device: torch.device
    autocast: torch.dtype | None
    tokenizer: Any
    model_path: Path
    data: TrainData
    log: Callable[[str], None] = print
    console: Any = None
    resume: bool = False
    resolved: dict[str, Any] | None = None  # the config the weights depend on (rundir.resolved_config)
    varlen: bool = False  # packed batches are one row with segments: varlen or flex (set when the model is loaded)
    attention: str = "varlen"  # train.attention resolved for the device (varlen | mask | flex)
    compile: bool = False  # train.compile resolved: decoder layers compiled during fit
    memory: Any = None  # the MemoryEstimate made before loading (tunelab.train.memory), None when none could be
    fsdp: bool = False  # the model is sharded with FSDP2 when fit prepares it (tunelab.train.sharding)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast_ctx(self):
        return autocast_ctx(self.device, self.autocast)

    @property
    def pad_to(self) -> int | None:
        """Packed rows are padded to a multiple of this (compiled layers, flex's 128-token blocks); None: not."""
        from tunelab.train.compile import ROW_MULTIPLE

        return ROW_MULTIPLE if self.compile or (self.attention == "flex" and self.cfg.train.packing) else None


def start_session(cfg: TrainConfig, *, resume: bool = False, dry_run: bool = False, force: bool = False,
                  log: Callable[[str], None] = print, console=None) -> TrainSession:
    """Processes, seeds, tokenizer and data: everything before the model is loaded (also the dry run). A --out that
    holds another run is refused (rundir.check_out_dir); with ``force`` its run files are removed first."""
    from accelerate import Accelerator

    from tunelab.models.convert import resolve_local_path
    from tunelab.train.data import load_train_data

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    want_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available", where="train.device")
    check_fsdp(cfg)  # a setting an FSDP config asks for that tunelab cannot honour: one error line
    accelerator = Accelerator(cpu=want_cpu, mixed_precision="no")
    fsdp = enable_fsdp(accelerator)
    device = accelerator.device
    seed_everything(cfg.train.seed)
    model_path = resolve_local_path(cfg.model)
    tok = load_tokenizer(model_path)
    spec = None
    if cfg.data.prompt:
        from tunelab.prompts import load_prompt_spec

        spec = load_prompt_spec(cfg.data.prompt)
    data = load_train_data(cfg.data, tok, method=cfg.method, spec=spec)
    out = Path(cfg.out)
    resolved = check_out_dir(cfg, out, resume=resume, force=force, dry_run=dry_run)
    # Every process checks --out before the main one writes into it (metrics.jsonl, run_config.json at fit's start):
    # a process slower to get here (a loaded machine) would otherwise find those files and refuse the run as
    # "an earlier run" (seen once in CI: exit 2 on rank 1 of the FSDP2 test).
    accelerator.wait_for_everyone()
    run = TrainSession(cfg, out, accelerator, device, pick_autocast(cfg.train.dtype, device), tok, model_path, data,
                       log=log if accelerator.is_main_process else (lambda s: None), console=console, resume=resume,
                       resolved=resolved, fsdp=fsdp)
    check_batching(run)
    run.attention, run.compile = check_gpu_settings(cfg, device)
    run.memory = preflight(run)  # before any weight is loaded; over train.max_memory_gb: refused
    if force and not dry_run:
        if run.is_main and (gone := clear_run(out)):
            run.log(f"--force: removed the earlier run's {', '.join(gone)} from {out}")
        accelerator.wait_for_everyone()
    return run


def check_batching(run: TrainSession) -> None:
    t, n, w = run.cfg.train, len(run.data.examples), run.world
    if t.batch_size % w:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must split evenly over {w} processes",
                          where="train.batch_size")
    if n < t.batch_size:
        raise ConfigError(f"only {n} examples, fewer than train.batch_size ({t.batch_size}); lower --batch-size",
                          where="train.batch_size")


def check_gpu_settings(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """``train.attention`` and ``train.compile`` resolved for ``device``; a setting that cannot run here is one
    error line (before any weight is loaded)."""
    from tunelab.train.attention import flex_available, resolve_attention
    from tunelab.train.compile import resolve_compile

    t = cfg.train
    attention = resolve_attention(t.attention, device)
    if attention == "flex":
        if device.type != "cuda":
            raise ConfigError("train.attention flex trains on CUDA only: torch's flex attention has no backward on a "
                              "CPU; use varlen (the CPU's default) or mask", where="train.attention")
        if why := flex_available():
            raise ConfigError(f"train.attention is flex but {why}; use mask or varlen", where="train.attention")
    return attention, resolve_compile(t.compile, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover
        pass
